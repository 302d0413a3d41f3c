"""`python -m tools.bench offpolicy`: the demo's r1_zero stage (80 steps × 16 prompts × 8 samples, from a
pretrained base) in each rollout.mode on the same two threads, for throughput and for learning.

sync gives both threads to each phase in turn (the engine in the trainer's process, then the trainer); the
overlapped modes give one to the engine process (vLLM's CPU worker bound to core 0) and one to the trainer.
Every mode trains with the same loss (TIS at cap 2, which the off-policy modes require) on the same prompt
stream; samples/s is the median over the steps after the first two (engine start-up and the first batches
generated ahead distort those), and held-out pass@1 after the run is the learning comparison (the issue's
bar: within 10 points of sync).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from tools.bench_grpo import _sh

ROOT = Path(__file__).resolve().parents[1]
MODES = {  # the modes compared; sync is the reference
    "sync": ["rollout.mode=sync"],
    "one_step_off": ["rollout.mode=one_step_off"],
    "async": ["rollout.mode=async", "rollout.max_staleness=2"],
    # the same lag, each step's generation interrupted after 8 tokens and finished on the next weights
    # the same lag, tokens whose π_old/π_engine leaves [0.5, 2] masked out (IcePop) instead of truncated
    "async_icepop": ["rollout.mode=async", "rollout.max_staleness=2", "stage.rl.engine_correction=icepop"],
    "async_partial": [
        "rollout.mode=async",
        "rollout.max_staleness=2",
        "rollout.partial=true",
        "rollout.partial_tokens=8",
    ],
}
WARM_STEPS = 2  # steps left out of the throughput medians


def _env(mode: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), R1_NO_PROGRESS="1", WANDB_MODE="offline")
    if mode == "sync":  # the in-process engine and the trainer share both threads, in turn
        return dict(env, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
    half = max(threads // 2, 1)  # the engine process on the first cores, the trainer on the rest
    return dict(env, OMP_NUM_THREADS=str(max(threads - half, 1)), VLLM_CPU_OMP_THREADS_BIND=f"0-{half - 1}")


def _train(args: list, env: dict) -> None:
    _sh([sys.executable, "-m", "rlhf.train", *args], env)


def offpolicy(args) -> dict:
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else Path(tmp) / "base"
        if not args.base:
            _train(["stage=pretrain", f"run_dir={base}", "logger=none"], _env("sync", args.threads))
        for mode, overrides in {m: MODES[m] for m in _modes(args.modes)}.items():
            runs = []
            for seed in seeds:
                run = Path(tmp) / f"{mode}_{seed}"
                common = [f"stage.init_from={base}", f"run_dir={run}", f"seed={seed}", "stage.rl.tis_cap=2"]
                _train(
                    ["stage=r1_zero", *common, *overrides, "stage.train.save_every=0", "logger=none", *args.overrides],
                    _env(mode, args.threads),
                )
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                evals = json.loads((run / "eval.json").read_text())
                runs.append((rows[WARM_STEPS:], rows, evals))
            figures[mode] = _summary(runs)
    sync, others = figures.get("sync"), [m for m in figures if m != "sync"]
    return {
        "figures": {**figures, "threads": args.threads, "seeds": seeds},
        "ratios": {f"{m}_over_sync": figures[m]["samples_per_s"] / sync["samples_per_s"] for m in others if sync},
        "learning": {
            f"{m}_pass@1_minus_sync": figures[m]["final_pass@1"] - sync["final_pass@1"] for m in others if sync
        },
    }


def _modes(asked: list[str] | None) -> list[str]:
    unknown = set(asked or ()) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes {' '.join(sorted(unknown))}: unknown; expected some of {', '.join(MODES)}")
    return asked or list(MODES)


def _summary(runs: list) -> dict:
    timed = [r for steady, _, _ in runs for r in steady]
    every = [r for _, rows, _ in runs for r in rows]
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    samples = statistics.median(r["perf/samples_per_s"] for r in timed)
    return {
        "samples_per_s": samples,
        "median_step_s": med("perf/step_s"),
        "generation_wait_s": med("time/generation_wait_s"),
        "engine_idle_s": med("perf/engine_idle_s"),
        "mean_completion_tokens": statistics.mean(r["response_length/mean"] for r in every),
        "samples_per_step": statistics.median(r["perf/samples_per_s"] * r["perf/step_s"] for r in timed),
        "staleness_mean": statistics.mean(r["rollout/staleness_mean"] for r in every),
        "steps": len(every) // len(runs),
        "base_pass@1": statistics.mean(e["base"]["pass@1"] for _, _, e in runs),
        "final_pass@1": statistics.mean(e["final"]["pass@1"] for _, _, e in runs),
        "final_pass@1_per_seed": [e["final"]["pass@1"] for _, _, e in runs],
        # mean reward of each 10-step window, averaged over seeds: how learning progressed
        "reward_by_10_steps": [
            round(statistics.mean(r["reward/mean"] for _, rows, _ in runs for r in rows[i : i + 10]), 3)
            for i in range(0, len(runs[0][1]), 10)
        ],
    }
