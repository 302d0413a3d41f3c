"""Trainer -> vLLM weight sync through parallel.hf_bridge, end to end (one process; CPU, or GPU in tests/test_gpu.py).

    python tests/dist/weight_sync_worker.py OUT.json [MODEL]      (MODEL: tiny_dense (default), tiny_dsv3)

vLLM starts from save_hf(initial weights); one train_step; parallel.weight_sync.sync_weights (the call the
R1-Zero loop makes) -> VLLMEngine.update_weights. At each point the engine's log-probs are compared with the
trainer's (megatron forward through rlhf.grpo.logprobs, temperature 1) on two sequences: a fixed token
sequence (every position scored by the engine as prompt log-probs) and a completion the engine samples at
temperature 1 (seeded). For DeepSeek-V3 the router's expert bias (a buffer that the step moves) is also read
back from the engine.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import parallel  # noqa: E402,F401
from core.compose import compose  # noqa: E402
from core.data import causal_mask  # noqa: E402
from parallel import hf_bridge  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from parallel.weight_sync import sync_weights  # noqa: E402
from parallel.policy import build_policy, unwrap
from parallel.step import train_step

PROMPT = [1, 64, 36, 22, 35, 85, 9, 80]
FIXED = PROMPT + [17, 3, 99, 42, 42, 7, 120, 56, 0, 88, 31, 64, 5, 77, 12, 101]  # every id < 128 (both vocabularies)
SAMPLE_TOKENS = 12


def trainer_logprobs(policy, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion | prompt) per token as GRPO computes old_logp (the refit probe's pass)."""
    from rlhf.refit_probe import trainer_logprobs as score

    return score(policy, prompt + completion)[len(prompt) - 1 :]


def engine_fixed_logprobs(engine, seq: list[int]) -> list[float]:
    """The engine's log p(seq[i] | seq[:i]) for i >= 1 (prompt log-probs)."""
    return engine.score(seq)


def max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def compare(engine, policy, sampling) -> dict:
    fixed_engine = engine_fixed_logprobs(engine, FIXED)
    fixed_trainer = trainer_logprobs(policy, FIXED[:1], FIXED[1:])
    c = engine.generate([PROMPT], sampling).completions[0][0]
    sampled_trainer = trainer_logprobs(policy, PROMPT, c.token_ids)
    return {"fixed": max_gap(fixed_engine, fixed_trainer), "sampled": max_gap(c.logprobs, sampled_trainer),
            "sampled_tokens": c.token_ids, "fixed_mean_logp": sum(fixed_trainer) / len(fixed_trainer)}


def mismatch(engine, policy, sampling) -> dict:
    """The mismatch oracle (rlhf.consistency) at the whole vocabulary, exact, on 4 completions the engine
    samples: the KL and TV between its next-token distributions and the trainer's, as a GRPO step sees them."""
    from rlhf import consistency, grpo
    from rlhf.rollout import RolloutBatch, Sample

    cfg = policy.cfg
    many = dataclasses.replace(sampling, n=4, top_logprobs=-1)
    samples = [Sample({}, PROMPT, c.token_ids, c.logprobs, c.finish_reason, top_ids=c.top_ids,
                      top_logprobs=c.top_logprobs) for c in engine.generate([PROMPT], many).completions[0]]
    batch = RolloutBatch.of([samples], len(PROMPT) + SAMPLE_TOKENS, pad_id=0)
    scored = grpo.scoring_pass(policy, batch.tensors(), 4, 1.0, oracle=True)
    batch.old_logp, batch.trainer_top_logp = scored.logp, scored.top_logp
    row = consistency.oracle(batch, cfg.model.vocab_size, SAMPLE_TOKENS, max_kl=0.0, step=0)
    return {k.split("/")[1]: row[k] for k in ("consistency/kl_mean", "consistency/kl_max", "consistency/tv_max")}


def _engine_expert_bias(worker) -> dict:
    """On the vLLM worker: every e_score_correction_bias (the DeepSeek-V3 router's expert bias), as lists."""
    return {n: b.detach().float().cpu().tolist() for n, b in worker.model_runner.model.named_buffers()
            if n.endswith("e_score_correction_bias")} | {
            n: b.detach().float().cpu().tolist() for n, b in worker.model_runner.model.named_parameters()
            if n.endswith("e_score_correction_bias")}


def _engine_mla_absorbed_gap(worker) -> float | None:
    """On the vLLM worker: how far MLA's absorbed W_UK_T / W_UV (derived from kv_b_proj after a load, not
    synced themselves) are from the kv_b_proj the engine now holds; None without MLA."""
    gaps = []
    for module in worker.model_runner.model.modules():
        if getattr(module, "W_UV", None) is None or getattr(module, "kv_b_proj", None) is None:
            continue
        w = module.kv_b_proj.weight.detach().T.reshape(module.kv_lora_rank, module.num_heads, -1)
        w_uk, w_uv = w.split([module.qk_nope_head_dim, module.v_head_dim], dim=-1)
        gaps.append(float((module.W_UV - w_uv.transpose(0, 1)).abs().max()))
        gaps.append(float((module.W_UK_T - w_uk.permute(1, 2, 0)).abs().max()))
    return max(gaps) if gaps else None


def trainer_expert_bias(policy) -> list[torch.Tensor]:
    """The router expert biases of the decoder's MoE layers, in layer order (MTP layers excluded)."""
    model = unwrap(policy.chunks[0])
    return [b.detach().float().cpu().clone() for n, b in model.named_buffers()
            if n.startswith("decoder.") and n.endswith("router.expert_bias")]


def engine_bias_gap(engine, policy) -> float | None:
    theirs = engine.llm.collective_rpc(_engine_expert_bias)[0]
    ours = trainer_expert_bias(policy)
    if not ours and not theirs:
        return None
    assert len(theirs) == len(ours), (sorted(theirs), len(ours))
    by_layer = [torch.tensor(theirs[k]) for k in sorted(theirs, key=lambda k: int(k.split(".")[2]))]
    return max(float((a - b).abs().max()) for a, b in zip(by_layer, ours))


def main() -> None:
    torch.set_num_threads(1)  # before vLLM starts: its CPU worker freezes the thread count
    out = Path(sys.argv[1])
    model = sys.argv[2] if len(sys.argv) > 2 else "tiny_dense"
    t_start = time.perf_counter()
    cfg = compose([f"model={model}", "logger=none", "stage.train.optim.lr=0.01", "stage.train.optim.schedule=constant"])
    P.init_distributed(cfg)
    policy = build_policy(cfg)
    m = cfg.model
    workdir = Path(tempfile.mkdtemp(prefix="weight_sync_"))
    hf_bridge.save_hf(policy, workdir / "init")

    from inference import vllm_worker
    from inference.engine import Sampling, build_engine

    engine = build_engine("vllm", model_dir=str(workdir / "init"), max_model_len=64, kv_cache_bytes=64 * 2**20,
                          timeout_s=300, max_logprobs=-1)
    sampling = Sampling(temperature=1.0, max_new_tokens=SAMPLE_TOKENS, seed=1234)
    t_engine = time.perf_counter()
    try:
        init = compare(engine, policy, sampling)
        oracle = {"init": mismatch(engine, policy, sampling)}
        init_bias = engine_bias_gap(engine, policy)
        bias_before = trainer_expert_bias(policy)

        t = torch.randint(0, m.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
        batch = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(4, 16),
                      position_ids=torch.arange(16).expand(4, 16), attention_mask=causal_mask(16))]
        steps = [train_step(policy, batch) for _ in range(2)]  # the scheduler reports lr 0 on step 1
        step = steps[-1]
        moved = [float((a - b).abs().max()) for a, b in zip(trainer_expert_bias(policy), bias_before)]
        bias_moved = max(moved) if moved else None

        stale = compare(engine, policy, sampling)  # engine still on the initial weights
        oracle["stale"] = mismatch(engine, policy, sampling)  # as if a sync had been skipped
        stale_bias = engine_bias_gap(engine, policy)
        t_sync = time.perf_counter()
        sync = sync_weights(policy, engine, cfg.rollout.sync_bucket_bytes)
        sync_s = time.perf_counter() - t_sync
        synced = compare(engine, policy, sampling)
        oracle["synced"] = mismatch(engine, policy, sampling)
        synced_bias = engine_bias_gap(engine, policy)
        mla_gap = engine.llm.collective_rpc(_engine_mla_absorbed_gap)[0]
        # A second sync of unchanged weights, in many small buckets, must not move what the engine serves
        # (the MoE re-pack is idempotent; buckets only group the stream).
        resync = sync_weights(policy, engine, 2**20)
        resynced = compare(engine, policy, sampling)
        if m.is_moe:  # one more step, synced with the CPU MoE kernel's re-pack switched off: stale experts
            train_step(policy, batch)
            repack, vllm_worker.repack_moe_experts = vllm_worker.repack_moe_experts, lambda worker: 0
            try:
                sync_weights(policy, engine, cfg.rollout.sync_bucket_bytes)
            finally:
                vllm_worker.repack_moe_experts = repack
            oracle["no_repack"] = mismatch(engine, policy, sampling)
            oracle["repacked_modules"] = engine.llm.collective_rpc(vllm_worker.repack_moe_experts)[0]
            oracle["repacked"] = mismatch(engine, policy, sampling)  # the re-pack alone puts it right
    finally:
        engine.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    out.write_text(json.dumps(dict(
        model=model, init=init, stale=stale, synced=synced, resynced=resynced, oracle=oracle,
        init_bias_gap=init_bias, stale_bias_gap=stale_bias, synced_bias_gap=synced_bias, bias_moved=bias_moved,
        synced_mla_absorbed_gap=mla_gap,
        sync={**sync, "wall_s": sync_s}, resync_buckets=resync["buckets"], seconds={"setup": t_engine - t_start, "total": time.perf_counter() - t_start},
        step={k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in step.items()},
    ), indent=1))
    P.shutdown()


if __name__ == "__main__":
    main()
