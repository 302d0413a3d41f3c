"""`python -m tools.bench rollout|weight_sync`, in one process each, on the demo's tiny_dense model.

rollout: the same prompts, sampling and thread count through our engine path (token ids in, samples
with log-probs out), through bare vLLM (`LLM.generate` on the same engine object), and through the
transformers reference engine. weight_sync: one trainer → engine sync vs one GRPO update and vs a whole step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from parallel.policy import build_policy


def _setup(threads: int, base: str | None, overrides: list[str]):
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # else vLLM drops the process to 1 thread when it starts
    torch.set_num_threads(threads)
    import parallel  # noqa: F401
    from core.compose import compose
    from core.run_tokenizer import run_tokenizer
    from parallel import checkpoint as ckpt
    from parallel import hf_bridge
    from parallel import parallelize as P

    cfg = compose(["stage=r1_zero", "logger=none", *overrides])
    P.init_distributed(cfg)
    policy = build_policy(cfg)
    if base:
        ckpt.load(policy, Path(base) / "checkpoints", with_optimizer=False)
        policy.step = 0
    tok = run_tokenizer(cfg, weights_from=base or "")
    hf_dir = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    hf_bridge.save_hf(policy, hf_dir, tokenizer=tok)
    return cfg, policy, tok, hf_dir


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rollout(args) -> dict:
    from core.run_tokenizer import stop_token_ids
    from inference.engine import Sampling, build_engine
    from rlhf.prompts import load_prompts, prompt_ids
    from rlhf.rollout import generate_groups

    cfg, policy, tok, hf_dir = _setup(args.threads, args.base, args.overrides)
    r, rl = cfg.rollout, cfg.stage.rl
    rows = load_prompts(cfg.data, "train", tok, cfg.reward.answer)[: rl.prompts_per_step]
    sampling = Sampling(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=1,
        stop_token_ids=stop_token_ids(tok),
    )
    samples = len(rows) * r.n
    engine = build_engine(
        "vllm", model_dir=str(hf_dir), max_model_len=cfg.stage.train.seq_length, kv_cache_bytes=r.kv_cache_bytes
    )
    from vllm import SamplingParams, TokensPrompt

    ids = [prompt_ids(tok, row) for row in rows]
    params = SamplingParams(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        max_tokens=r.max_new_tokens,
        seed=1,
        stop_token_ids=list(stop_token_ids(tok)),
        logprobs=0,
        detokenize=False,
    )
    bare = lambda: engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)  # noqa: E731
    ours = lambda: generate_groups(engine, tok, rows, sampling)  # noqa: E731
    tokens = sum(len(s.completion_ids) for g in generate_groups(engine, tok, rows, sampling)[0] for s in g)
    t_ours, t_bare = _median_time(ours, args.steps), _median_time(bare, args.steps)
    engine.shutdown()
    hf = build_engine("hf", model_dir=str(hf_dir), max_model_len=cfg.stage.train.seq_length)
    hf_tokens = sum(len(s.completion_ids) for g in generate_groups(hf, tok, rows, sampling)[0] for s in g)
    t_hf = _median_time(lambda: generate_groups(hf, tok, rows, sampling), max(1, args.steps // 3))
    figures = {
        "samples": samples,
        "completion_tokens": tokens,
        "hf_completion_tokens": hf_tokens,  # sampled by another RNG: equal work only on average
        "threads": args.threads,
        "ours_s": t_ours,
        "bare_vllm_s": t_bare,
        "hf_generate_s": t_hf,
        "ours_samples_per_s": samples / t_ours,
        "bare_vllm_samples_per_s": samples / t_bare,
        "hf_samples_per_s": samples / t_hf,
    }
    return {"figures": figures, "ratios": {"ours_over_vllm": t_bare / t_ours, "ours_over_hf": t_hf / t_ours}}


def weight_sync(args) -> dict:
    """One sync against one GRPO update (sync_over_update) and against a whole step (sync_over_step): the
    rollout of a step's prompts × n, the old and reference log-prob passes, the update and the sync (reward
    scoring, evaluation and checkpoints, which a step may add, left out: the ratio is an upper bound)."""
    import torch

    from core.run_tokenizer import stop_token_ids
    from inference.engine import build_engine
    from parallel.weight_sync import sync_weights
    from rlhf import grpo
    from rlhf.losses import LossSettings
    from rlhf.prompts import load_prompts
    from rlhf.rollout import generate_groups, sampling

    cfg, policy, tok, hf_dir = _setup(args.threads, args.base, args.overrides)
    r, rl, t = cfg.rollout, cfg.stage.rl, cfg.stage.train
    engine = build_engine("vllm", model_dir=str(hf_dir), max_model_len=t.seq_length, kv_cache_bytes=r.kv_cache_bytes)
    n, length = rl.prompts_per_step * r.n, t.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 100, (n, length), generator=g)
    batch = {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": torch.ones(n, length),
        "engine_logp": torch.zeros(n, length),
        "position_ids": torch.arange(length).expand(n, length),
        "advantages": torch.randn(n, 1, generator=g).expand(n, length),
    }
    batch["old_logp"], _ = grpo.logprobs(policy, batch, t.micro_batch_size, 1.0)
    settings = LossSettings.from_config(rl, r.max_new_tokens)
    t_step = _median_time(
        lambda: grpo.update(policy, batch, settings, rl.minibatches, t.micro_batch_size, 1.0), args.steps
    )
    t_score = 2 * _median_time(lambda: grpo.logprobs(policy, batch, t.micro_batch_size, 1.0), args.steps)
    rows = load_prompts(cfg.data, "train", tok, cfg.reward.answer)[: rl.prompts_per_step]
    how = sampling(r, cfg.seed, 0, stop_token_ids(tok))
    t_rollout = _median_time(lambda: generate_groups(engine, tok, rows, how), args.steps)
    stats = sync_weights(policy, engine, r.sync_bucket_bytes)
    t_sync = _median_time(lambda: sync_weights(policy, engine, r.sync_bucket_bytes), args.steps)
    engine.shutdown()
    t_whole = t_rollout + t_score + t_step + t_sync
    figures = {
        "sync_s": t_sync,
        "train_step_s": t_step,
        "scoring_passes_s": t_score,  # old and reference log-probs
        "rollout_s": t_rollout,
        "whole_step_s": t_whole,
        "tensors": stats["tensors"],
        "bytes": stats["bytes"],
        "buckets": stats["buckets"],
        "threads": args.threads,
        "samples_per_step": n,
        "tokens_per_sample": length,
        "parameters": sum(p.numel() for c in policy.chunks for p in c.parameters()),
        "overrides": args.overrides,
    }
    return {"figures": figures, "ratios": {"sync_over_update": t_sync / t_step, "sync_over_step": t_sync / t_whole}}
