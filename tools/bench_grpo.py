"""`python -m tools.bench grpo_vs_trl [--scale tiny|realistic]`: one GRPO step of ours (r1_zero stage:
vLLM rollouts, megatron updates) vs TRL's GRPOTrainer (tools/trl_peer.py), same base model, task, group
size, lengths and thread count; plus model-FLOP utilization against this machine's measured fp32 matmul
peak. `tiny` (here): the demo's model and batch after a short pretraining; `realistic`:
tools/bench_realistic.py."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tools import bench_train

ROOT = Path(__file__).resolve().parents[1]


def _sh(cmd: list, env: dict) -> None:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"benchmark step failed: {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")


def matmul_peak(threads: int) -> float:
    """Best fp32 FLOP/s of a 1024² matmul on `threads` threads (the roofline MFU is measured against)."""
    import torch

    torch.set_num_threads(threads)
    return bench_train.matmul_peak("cpu", torch.float32, 1024)


def model_flops(cfg: dict, params: int, row: dict) -> dict:
    """Model FLOPs of one step (its metrics row), on the tokens it holds, padding excluded: 2·P per token of
    a forward pass and 6·P of a trained one, plus causal attention, 2·layers·hidden·L² per length-L
    sequence forward (QKᵀ and AV over the L(L+1)/2 visible pairs), 3× that trained. The train phase runs
    the forward-only passes (old log-probs unless one minibatch makes the update on-policy, the
    reference when a KL estimator is on) and the update; generation is one forward over each sample."""
    rl, m = cfg["stage"]["rl"], cfg["model"]
    tokens, squares = row["perf/sequence_tokens"], row["perf/sequence_tokens_sq"]
    scoring = (rl["minibatches"] > 1) + (rl["kl"] != "none" and rl["kl_coef"] > 0)
    forward = bench_train.forward_flops(params, m["num_layers"], m["hidden_size"], tokens, squares)
    return {"train": (scoring + 3) * forward, "generation": forward}


def phase_medians(rows: list[dict]) -> dict:
    """The step-time ledger's phases (core.ledger), median seconds over `rows`, those with any time."""
    from core.ledger import PHASES

    out = {p: statistics.median(r[f"time/{p}_s"] for r in rows) for p in PHASES}
    return {p: v for p, v in out.items() if v > 0}


def ours_config(overrides: list[str], env: dict) -> dict:
    """The composed r1_zero config under `overrides`, with the model's parameter count."""
    probe = [sys.executable, "-c", _CFG, *overrides]
    out = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def grpo_vs_trl(args) -> dict:
    threads = args.threads
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), R1_NO_PROGRESS="1", WANDB_MODE="offline")
    py = sys.executable
    if args.scale == "realistic":
        from tools.bench_realistic import realistic

        with tempfile.TemporaryDirectory() as tmp:
            return realistic(args, env, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else Path(tmp) / "base"
        if not args.base:  # a short pretrain: completions need realistic lengths, not a random model's
            _sh(
                [py, "-m", "rlhf.train", "stage=pretrain", f"run_dir={base}", "stage.train.steps=300", "logger=none"],
                env,
            )
        ours = Path(tmp) / "ours"
        steps = args.steps + 1
        _sh(
            [
                py,
                "-m",
                "rlhf.train",
                "stage=r1_zero",
                f"stage.init_from={base}",
                f"run_dir={ours}",
                f"stage.train.steps={steps}",
                "stage.train.save_every=0",
                "data.num_eval=4",
                "eval.k=1",
                "logger=none",
            ],
            env,
        )
        rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()][1:]  # step 1: warm-up
        cfg = ours_config([], env)
        rl, rollout = cfg["stage"]["rl"], cfg["rollout"]
        _sh(
            [
                py,
                ROOT / "tools" / "trl_peer.py",
                "--model-dir",
                ours / "hf_init",
                "--out",
                Path(tmp) / "trl.json",
                "--prompts",
                rl["prompts_per_step"],
                "--generations",
                rollout["n"],
                "--max-new-tokens",
                rollout["max_new_tokens"],
                "--minibatches",
                rl["minibatches"],
                "--rollouts",
                steps,
                "--threads",
                threads,
                "--lr",
                cfg["stage"]["train"]["optim"]["lr"],
                "--beta",
                rl["kl_coef"],
            ],
            env,
        )
        trl = json.loads((Path(tmp) / "trl.json").read_text())
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    samples = rl["prompts_per_step"] * rollout["n"]
    flops = {k: statistics.median(model_flops(cfg, cfg["params"], r)[k] for r in rows) for k in ("train", "generation")}
    peak = matmul_peak(threads)
    ours_fig = {
        "median_step_s": med("perf/step_s"),
        "median_cpu_s": med("perf/cpu_s"),
        "samples_per_s": samples / med("perf/step_s"),
        "rollout_s": med("perf/rollout_s"),
        "train_s": med("perf/train_s"),
        "sync_s": med("sync/seconds"),
        "mean_completion_tokens": statistics.mean(r["response_length/mean"] for r in rows),
        "train_flops": flops["train"],
        "train_flops_per_s": flops["train"] / med("perf/train_s"),
        "step_flops": flops["train"] + flops["generation"],
        "step_flops_per_s": (flops["train"] + flops["generation"]) / med("perf/step_s"),
        "sequence_tokens": med("perf/sequence_tokens"),
        # The step-time ledger (core.ledger): median seconds per phase and the share of the step they cover
        "phases_s": phase_medians(rows),
        "ledger_covered_frac": min(r["time/covered_frac"] for r in rows),
    }
    return {
        "figures": {
            "ours": ours_fig,
            "trl": trl,
            "matmul_peak_flops_per_s": peak,
            "threads": threads,
            "params": cfg["params"],
            "samples_per_step": samples,
            "timed_steps": len(rows),
        },
        "ratios": {
            "ours_over_trl": ours_fig["samples_per_s"] / trl["samples_per_s"],
            "ours_over_trl_cpu": trl["median_cpu_s"] / ours_fig["median_cpu_s"],
            "train_mfu": ours_fig["train_flops_per_s"] / peak,
            "step_mfu": ours_fig["step_flops_per_s"] / peak,
        },
    }


# The composed r1_zero config (overrides from argv) and the model's parameter count, one JSON line.
_CFG = """
import json, dataclasses, sys, torch
import parallel
from core.compose import compose
from parallel import parallelize as P
from parallel.policy import build_policy
cfg = compose(["stage=r1_zero", "logger=none", *sys.argv[1:]])
P.init_distributed(cfg)
params = sum(p.numel() for p in build_policy(cfg, with_optimizer=False).chunks[0].parameters())
P.shutdown()
print(json.dumps({**dataclasses.asdict(cfg), "params": params}))
"""
