"""GPU checks in one process: python tests/dist/gpu_worker.py CASE:MODEL OUTDIR (see tests/test_gpu.py)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from core.compose import compose  # noqa: E402
from parallel import checkpoint as ckpt  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from parallel.policy import build_policy
from parallel.step import train_step
from tests.conftest import grpo_batch, lm_batch  # noqa: E402


def logits(policy, mb):
    device = next(policy.chunks[0].parameters()).device
    mb = {k: v.to(device) for k, v in mb.items()}
    with torch.no_grad():
        return policy.chunks[0](mb["tokens"], mb["position_ids"], mb["attention_mask"]).float()


def vllm_sleep(model: str, out: Path) -> dict:
    """The colocated engine's sleep()/wake_up() (vLLM sleep mode, level 1): sleeping gives back the KV
    cache and the weights' GPU memory; after wake_up the engine serves the same model, and a weight sync
    after wake_up (the RL order: sleep, train, wake_up, sync) serves the new one."""
    from inference.engine import Sampling, build_engine
    from parallel import hf_bridge

    cfg = compose([f"model={model}", "logger=none"])
    P.init_distributed(cfg)
    policy = build_policy(cfg, with_optimizer=False)
    hf_bridge.save_hf(policy, out / "hf")
    kv_bytes = 2 * 2**30
    engine = build_engine("vllm", model_dir=str(out / "hf"), max_model_len=64, kv_cache_bytes=kv_bytes, timeout_s=300)
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    prompt = [[1, 64, 36, 22, 35, 85, 9, 80]]

    def serve():
        c = engine.generate(prompt, greedy).completions[0][0]
        return c.token_ids, c.logprobs

    def free() -> int:
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]

    try:
        before, free_awake = serve(), free()
        engine.sleep()
        free_asleep = free()
        engine.wake_up()
        free_woken = free()
        after = serve()
        # Changed weights synced after a sleep/wake cycle reach the engine.
        with torch.no_grad():
            for p in policy.chunks[0].parameters():
                p.mul_(1.5)
        engine.sleep()
        engine.wake_up()
        engine.update_weights(hf_bridge.export_hf(policy))
        changed = serve()
    finally:
        engine.shutdown()
    return {"kv_bytes": kv_bytes, "freed_bytes": free_asleep - free_awake, "rewoken_bytes": free_asleep - free_woken,
            "same_tokens": before[0] == after[0],
            "logprob_max_diff": max(abs(a - b) for a, b in zip(before[1], after[1])),
            "changed_after_sync": changed != before}


def bf16_local(model: str, out: Path) -> dict:
    """The local (no Transformer Engine) spec on CUDA: GRPO's trimmed log-prob pass at fp32 against a
    plain log-softmax of the model's logits, then the same weights in bf16: logits near fp32's and
    training steps that lower the loss."""
    from core.data import micro_batches
    from parallel.step import forward_backward
    from rlhf import grpo

    cfg = compose([f"model={model}", "parallel.transformer_impl=local", "model.vocab_size=1000"])
    P.init_distributed(cfg)
    ref = build_policy(cfg, with_optimizer=False)
    batch = grpo_batch(cfg.model.vocab_size, s=64, ends=(20, 63, 40, 9, 33, 51), prompt=5)
    logp, _ = grpo.logprobs(ref, batch, 2, 1.0)
    padded = forward_backward(ref, micro_batches(batch, list(range(6)), 6), forward_only=True,
                              forward=grpo._forward(cfg.model.vocab_size, 1.0, None))[0]["logp"].cpu()
    mb = lm_batch(s=64, vocab=cfg.model.vocab_size)[0]
    want = logits(ref, mb)
    ckpt.save(ref, out / "weights", with_optimizer=False)
    bf16 = compose([f"model={model}", "parallel.transformer_impl=local", "model.vocab_size=1000",
                    "stage.train.dtype=bf16", "stage.train.optim.lr=1e-3"])
    policy = build_policy(bf16)
    ckpt.load(policy, out / "weights", with_optimizer=False)
    return {"trimmed_logprob_max_diff": float(((logp.cpu() - padded) * batch["loss_mask"]).abs().max()),
            "bf16_logits_max_diff": float((logits(policy, mb) - want).abs().max()),
            "logits_scale": float(want.abs().max()),
            "param_dtype": str(next(policy.chunks[0].parameters()).dtype),
            "losses": [train_step(policy, lm_batch(s=64, vocab=cfg.model.vocab_size))["loss"] for _ in range(5)]}


def main():
    case, out = sys.argv[1], Path(sys.argv[2])
    name, model = case.split(":")
    result = {}
    if name == "te_vs_local":
        local_cfg = compose([f"model={model}", "parallel.transformer_impl=local"])
        P.init_distributed(local_cfg)
        local = build_policy(local_cfg, with_optimizer=False)
        ckpt.save(local, out / "weights", with_optimizer=False)
        mb = lm_batch(s=64, vocab=local_cfg.model.vocab_size)[0]
        want = logits(local, mb)
        te_cfg = compose([f"model={model}", "parallel.transformer_impl=transformer_engine"])
        te = build_policy(te_cfg, with_optimizer=False)
        ckpt.load(te, out / "weights", with_optimizer=False)  # TE names differ; dist-ckpt maps them
        result = {"logits_max_diff": float((logits(te, mb) - want).abs().max()),
                  "te": "TE" in type(te.chunks[0].module.decoder.layers[0].self_attention.linear_proj).__name__}
    elif name == "fp8":
        cfg = compose([f"model={model}", "parallel.transformer_impl=transformer_engine", "parallel.fp8=hybrid",
                       "stage.train.dtype=bf16", "stage.train.optim.lr=1e-3"])
        P.init_distributed(cfg)
        policy = build_policy(cfg)
        result = {"losses": [train_step(policy, lm_batch(s=64, vocab=cfg.model.vocab_size))["loss"] for _ in range(5)]}
    elif name == "bf16_local":
        result = bf16_local(model, out)
    elif name == "vllm_sleep":
        result = vllm_sleep(model, out)
    result["backend"] = torch.distributed.get_backend()
    (out / f"{case}.json").write_text(json.dumps(result))
    P.shutdown()


if __name__ == "__main__":
    main()
