"""Trainer -> vLLM weight sync through parallel.hf_bridge, end to end (tiny_dense, one process, CPU).

    python tests/dist/weight_sync_worker.py OUT.json

vLLM starts from save_hf(initial weights); one train_step; export_hf -> VLLMEngine.update_weights; the
engine's greedy completion logprobs must equal the trainer's (megatron forward, log_softmax) on that sequence.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import parallel  # noqa: E402,F401
from core.config import compose  # noqa: E402
from core.model import causal_mask  # noqa: E402
from parallel import hf_bridge  # noqa: E402
from parallel import parallelize as P  # noqa: E402

PROMPT = [1, 64, 36, 22, 35, 85, 9, 80]


def logits_forward(batch, model):
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    return out, lambda o: (o.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": P.gather_logits(o).detach()})


def trainer_logprobs(policy, prompt, tokens, vocab):
    ids = torch.tensor([prompt + tokens])
    s = ids.shape[1]
    mb = dict(tokens=ids, position_ids=torch.arange(s).expand(1, s), attention_mask=causal_mask(s))
    for c in policy.chunks:
        c.eval()
    with torch.no_grad():
        logits = P.forward_backward(policy, [mb], forward_only=True, forward=logits_forward)[0]["logits"]
    for c in policy.chunks:
        c.train()
    logp = torch.log_softmax(logits[0, :, :vocab].float(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


def main() -> None:
    torch.set_num_threads(1)  # before vLLM starts: its CPU worker freezes the thread count
    out = Path(sys.argv[1])
    cfg = compose(["model=tiny_dense", "logger=none", "stage.train.optim.lr=0.01", "stage.train.optim.schedule=constant"])
    P.init_distributed(cfg)
    policy = P.build_policy(cfg)
    m = cfg.model
    workdir = Path(tempfile.mkdtemp(prefix="weight_sync_"))
    hf_bridge.save_hf(policy, workdir / "init")

    from inference.engine import Sampling
    from inference.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(workdir / "init"), max_model_len=64, kv_cache_bytes=64 * 2**20)
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    try:
        c0 = engine.generate([PROMPT], greedy).completions[0][0]
        init_diff = max(abs(a - b) for a, b in zip(c0.logprobs, trainer_logprobs(policy, PROMPT, c0.token_ids, m.vocab_size)))

        t = torch.randint(0, m.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
        batch = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(4, 16),
                      position_ids=torch.arange(16).expand(4, 16), attention_mask=causal_mask(16))]
        steps = [P.train_step(policy, batch) for _ in range(2)]  # the scheduler reports lr 0 on step 1
        step = steps[-1]

        c_stale = engine.generate([PROMPT], greedy).completions[0][0]
        engine.update_weights(hf_bridge.export_hf(policy))
        c1 = engine.generate([PROMPT], greedy).completions[0][0]
        mine = trainer_logprobs(policy, PROMPT, c1.token_ids, m.vocab_size)
        synced_diff = max(abs(a - b) for a, b in zip(c1.logprobs, mine))
        stale = trainer_logprobs(policy, PROMPT, c_stale.token_ids, m.vocab_size)
        stale_diff = max(abs(a - b) for a, b in zip(c_stale.logprobs, stale))
    finally:
        engine.shutdown()
    out.write_text(json.dumps(dict(init_diff=init_diff, synced_diff=synced_diff, stale_diff=stale_diff,
                                   step={k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in step.items()},
                                   tokens=c1.token_ids, logprobs=c1.logprobs), indent=1))
    P.shutdown()


if __name__ == "__main__":
    main()
