"""GPU checks in one process: python tests/dist/gpu_worker.py CASE:MODEL OUTDIR (see tests/test_gpu.py)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from core.config import compose  # noqa: E402
from parallel import checkpoint as ckpt  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from tests.conftest import lm_batch  # noqa: E402


def logits(policy, mb):
    mb = {k: v.cuda() for k, v in mb.items()}
    with torch.no_grad():
        return policy.chunks[0](mb["tokens"], mb["position_ids"], mb["attention_mask"]).float()


def main():
    case, out = sys.argv[1], Path(sys.argv[2])
    name, model = case.split(":")
    result = {}
    if name == "te_vs_local":
        local_cfg = compose([f"model={model}", "parallel.transformer_impl=local"])
        P.init_distributed(local_cfg)
        local = P.build_policy(local_cfg, with_optimizer=False)
        ckpt.save(local, out / "weights", with_optimizer=False)
        mb = lm_batch(s=64, vocab=local_cfg.model.vocab_size)[0]
        want = logits(local, mb)
        te_cfg = compose([f"model={model}", "parallel.transformer_impl=transformer_engine"])
        te = P.build_policy(te_cfg, with_optimizer=False)
        ckpt.load(te, out / "weights", with_optimizer=False)  # TE names differ; dist-ckpt maps them
        result = {"logits_max_diff": float((logits(te, mb) - want).abs().max()),
                  "te": "TE" in type(te.chunks[0].module.decoder.layers[0].self_attention.linear_proj).__name__}
    elif name == "fp8":
        cfg = compose([f"model={model}", "parallel.transformer_impl=transformer_engine", "parallel.fp8=hybrid",
                       "stage.train.dtype=bf16", "stage.train.optim.lr=1e-3"])  # fmt: skip
        P.init_distributed(cfg)
        policy = P.build_policy(cfg)
        result = {"losses": [P.train_step(policy, lm_batch(s=64, vocab=cfg.model.vocab_size))["loss"] for _ in range(5)]}
    result["backend"] = torch.distributed.get_backend()
    (out / f"{case}.json").write_text(json.dumps(result))
    P.shutdown()


if __name__ == "__main__":
    main()
