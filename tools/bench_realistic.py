"""`python -m tools.bench grpo_vs_trl --scale realistic`: one GRPO step of ours against TRL's GRPOTrainer in
every TRL mode that runs here, at an RL batch of realistic shape, in two length regimes. About 40 minutes
on 2 cores; run by hand, not in `make test`.

The model: a dense 8-layer, hidden-512 (head_dim 32) Qwen2-shaped model, 24M body parameters, untied head,
the demo's character tokenizer (so the body, not a 150k-row head, is the work), 32 prompts × 8 samples a
step, up to 128 new tokens, β and minibatches as the demo's. Both sides start from the same HF directory
(ours exports it from the same weights: tools.bench_grpo) and take the same prompts.

- forced: every completion is exactly 128 tokens (rollout.min_new_tokens / TRL's min_new_tokens or
  min_tokens), so both sides do the same work; checked: mean lengths within 5%.
- natural: long-tailed lengths as in reasoning rollouts. Random weights are shaped so the model ends a
  completion with a fixed probability per token (geometric lengths, mean about a third of the budget):
  every token's embedding carries a constant C on channel 0, which no layer writes (the attention and MLP
  output rows 0 are zero), so after the final norm that channel is √hidden for every position while the
  others are ~1/C small; the output head reads channel 0 only for EOS, by δ, giving EOS the logit offset
  √hidden·δ over ~uniform others.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAX_NEW = 128
SHAPE = [
    "model.hidden_size=512",
    "model.ffn_hidden_size=1536",
    "model.num_layers=8",
    "model.num_attention_heads=16",
    "model.num_query_groups=4",
    "model.tie_word_embeddings=false",
    "model.max_position_embeddings=512",
]
BATCH = [
    "stage.rl.prompts_per_step=32",
    "rollout.n=8",
    "stage.train.global_batch_size=256",
    "stage.train.micro_batch_size=32",
    "stage.train.micro_batch_tokens=5376",  # 32 full-length rows: short ones travel 32+ at a time
    f"rollout.max_new_tokens={MAX_NEW}",
    "data.max_prompt_tokens=40",  # the addition prompts: ≤ 33 tokens
    "stage.train.seq_length=null",  # derived: prompt + completion budget
    "rollout.kv_cache_bytes=1073741824",
]
TRL_MODES = ("generate", "vllm", "continuous")
# Measured here: transformers' continuous batching ignores min_new_tokens (mean 18.3 of 32 forced tokens)
FORCED_SKIPS = {"continuous": "transformers' continuous batching ignores min_new_tokens: unequal work"}


def run_timed(cmd: list, env: dict, timeout: float) -> dict:
    """Runs `cmd`; returns its wall and CPU seconds (the process and its children) and how it ended."""
    before, t0 = os.times(), time.perf_counter()
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        error = f"exit {proc.returncode}: {proc.stderr[-1500:]}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": time.perf_counter() - t0, "cpu_s_with_children": cpu, "error": error}


def eos_offset(vocab: int, budget: int) -> float:
    """The EOS logit offset over (vocab − 1) equal others that ends a completion with probability 3/budget
    per token: geometric lengths of mean ≈ budget / 3."""
    p = 3 / budget
    return math.log(p * (vocab - 1) / (1 - p))


# Builds the shaped random model as a checkpoint (run in a subprocess: megatron's process groups).
_SHAPED = """
import json, math, sys, torch
import parallel
from core.compose import compose
from core.run_tokenizer import run_tokenizer, stop_token_ids
from parallel import checkpoint as ckpt, parallelize as P
from parallel.policy import build_policy
out, offset, C = sys.argv[1], float(sys.argv[2]), 1000.0
cfg = compose(["stage=r1_zero", "logger=none", *sys.argv[3:]])
P.init_distributed(cfg)
policy = build_policy(cfg, with_optimizer=False)
stops = stop_token_ids(run_tokenizer(cfg))
h = cfg.model.hidden_size
with torch.no_grad():
    for name, p in policy.chunks[0].named_parameters():
        if "word_embeddings" in name:
            p[:, 0] = C
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            p[0, :] = 0  # no layer writes channel 0
        elif "output_layer" in name:
            p[:, 0] = 0
            p[list(stops), 0] = offset / math.sqrt(h)
ckpt.save(policy, out + "/checkpoints", with_optimizer=False)
params = sum(p.numel() for p in policy.chunks[0].parameters())
P.shutdown()
print(json.dumps({"params": params, "stops": list(stops)}))
"""


def realistic(args, env: dict, tmp: Path) -> dict:
    from tools.bench_grpo import matmul_peak, ours_config

    py, steps = sys.executable, args.steps + 1  # the first step of each run is warm-up
    env = dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
    overrides = [*SHAPE, *BATCH]
    cfg = ours_config(overrides, env)
    vocab = cfg["model"]["vocab_size"]
    base = tmp / "shaped"
    shaped = subprocess.run(
        [py, "-c", _SHAPED, base, str(eos_offset(vocab, MAX_NEW)), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if shaped.returncode:
        sys.exit(f"building the shaped model failed:\n{shaped.stderr[-4000:]}")
    rl, rollout = cfg["stage"]["rl"], cfg["rollout"]
    samples = rl["prompts_per_step"] * rollout["n"]
    regimes = {}
    for regime, forced in (("forced", MAX_NEW), ("natural", 0)):
        ours_dir = tmp / f"ours_{regime}"
        cmd = [py, "-m", "rlhf.train", "stage=r1_zero", f"stage.init_from={base}", f"run_dir={ours_dir}",
               f"stage.train.steps={steps}", "stage.train.save_every=0", "data.num_eval=4", "eval.k=1",
               "logger=none", f"rollout.min_new_tokens={forced}", *overrides]  # fmt: skip
        run = run_timed(cmd, env, timeout=1200)
        if run["error"]:
            sys.exit(f"our {regime} run failed: {run['error']}")
        rows = [json.loads(line) for line in (ours_dir / "metrics.jsonl").read_text().splitlines()][1:]
        ours = _ours_figures(rows, cfg, samples, run)
        trl = {}
        for mode in TRL_MODES:
            if forced and mode in FORCED_SKIPS:
                trl[mode] = {"skipped": FORCED_SKIPS[mode]}
                continue
            out = tmp / f"trl_{regime}_{mode}.json"
            cmd = [py, ROOT / "tools" / "trl_peer.py", "--model-dir", ours_dir / "hf_init", "--out", out,
                   "--prompts", rl["prompts_per_step"], "--generations", rollout["n"], "--max-new-tokens", MAX_NEW,
                   "--min-new-tokens", forced, "--minibatches", rl["minibatches"], "--rollouts", steps,
                   "--threads", args.threads, "--lr", cfg["stage"]["train"]["optim"]["lr"], "--beta", rl["kl_coef"],
                   "--mode", mode]  # fmt: skip
            peer = run_timed(cmd, env, timeout=args.trl_timeout)
            trl[mode] = json.loads(out.read_text()) if not peer["error"] else {"error": peer["error"]}
            trl[mode]["run"] = peer
        valid = {m: r for m, r in trl.items() if "samples_per_s" in r and _equal_work(forced, ours, r)}
        best = max(valid, key=lambda m: valid[m]["samples_per_s"]) if valid else None
        regimes[regime] = {
            "ours": ours,
            "trl": trl,
            "trl_fastest_mode": best,
            "ours_over_trl": ours["samples_per_s"] / valid[best]["samples_per_s"] if best else None,
        }
    peak = matmul_peak(args.threads)
    forced_ours = regimes["forced"]["ours"]
    return {
        "figures": {
            "scale": "realistic",
            "regimes": regimes,
            "matmul_peak_flops_per_s": peak,
            "threads": args.threads,
            "params": cfg["params"],
            "samples_per_step": samples,
            "timed_steps": args.steps,
            "model": dict(zip([o.split("=")[0] for o in SHAPE], [o.split("=")[1] for o in SHAPE])),
        },
        "ratios": {
            "ours_over_trl_forced": regimes["forced"]["ours_over_trl"],
            "ours_over_trl_natural": regimes["natural"]["ours_over_trl"],
            "train_mfu": forced_ours["train_flops"] / forced_ours["train_s"] / peak,
            "step_mfu": forced_ours["step_flops"] / forced_ours["median_step_s"] / peak,
        },
    }


def _equal_work(forced: int, ours: dict, trl: dict) -> bool:
    """Forced lengths must match (within 5%) for the comparison to count; natural ones are recorded."""
    ratio = trl["mean_completion_tokens"] / ours["mean_completion_tokens"]
    trl["completion_tokens_over_ours"] = ratio
    return not forced or abs(ratio - 1) <= 0.05


def _ours_figures(rows: list[dict], cfg: dict, samples: int, run: dict) -> dict:
    from tools.bench_grpo import model_flops, phase_medians

    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    flops = [model_flops(cfg, cfg["params"], r) for r in rows]
    return {
        "median_step_s": med("perf/step_s"),
        "median_cpu_s": med("perf/cpu_s"),
        "samples_per_s": samples / med("perf/step_s"),
        "mean_completion_tokens": statistics.mean(r["response_length/mean"] for r in rows),
        "train_s": med("perf/train_s"),
        "train_flops": statistics.median(f["train"] for f in flops),
        "step_flops": statistics.median(f["train"] + f["generation"] for f in flops),
        "phases_s": phase_medians(rows),
        "ledger_covered_frac": min(r["time/covered_frac"] for r in rows),
        "run": run,
    }
