"""Benchmarks: each one times our path against a peer run in the same script, and writes JSON whose
top-level `ratios` object holds the comparisons beside the raw figures.

    python -m tools.bench layouts --out bench_layouts.json
    python -m tools.bench rollout --out bench_rollout.json [--base runs/demo/pretrain]
    python -m tools.bench weight_sync --out bench_sync.json [model.hidden_size=512 model.num_layers=8 ...]
    python -m tools.bench grpo_vs_trl --out bench_grpo.json [--base runs/demo/pretrain] [--threads 2]
    python -m tools.bench grpo_vs_trl --scale realistic --out bench_grpo_realistic.json   (about 40 minutes)
    python -m tools.bench logprobs --out bench_logprobs.json [--threads 1]
    python -m tools.bench train_mfu --out bench_mfu.json [model=qwen2_5_1_5b ...]   (MFU against the device's peak)
    python -m tools.bench offpolicy --out bench_offpolicy.json [--base runs/demo/pretrain] [--seeds 2] [--first-seed 1234]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {}


def register(name: str):
    def add(fn):
        BENCHMARKS[name] = fn
        return fn

    return add


def _run(cmd: list, env: dict) -> None:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"benchmark step failed: {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")


@register("layouts")
def layouts(args: argparse.Namespace) -> dict:
    """Training-step time of each parallel layout vs the single-process run of the same model and
    batch (tests/dist/equivalence_worker.py; batch 4 x 16 tokens, fp32, gloo, 1 thread per rank)."""
    worker = ROOT / "tests" / "dist" / "equivalence_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), R1_BENCH_STEPS=str(args.steps))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _run([sys.executable, worker, "reference", work], env)
        for port, world, cases in ((29621, 2, args.cases2), (29622, 4, args.cases4)):
            _run([*torchrun, port, "--nproc-per-node", world, worker, "cases", work, *cases], env)
            rows += json.loads((work / "results.json").read_text())
            (work / "results.json").unlink()
    figures = {
        f"{r['case']}@{r['world']}": {
            "layout": r["layout"],
            "step_s": r["step_s"],
            "single_process_step_s": r["single_process_step_s"],
        }
        for r in rows
        if "step_s" in r
    }
    ratios = {k: round(v["step_s"] / v["single_process_step_s"], 3) for k, v in figures.items()}
    return {"figures": figures, "ratios": {"step_time_over_single_process": ratios}}


@register("grpo_vs_trl")
def grpo_vs_trl(args: argparse.Namespace) -> dict:
    from tools.bench_grpo import grpo_vs_trl as run

    return run(args)


@register("rollout")
def rollout(args: argparse.Namespace) -> dict:
    from tools.bench_rollout import rollout as run

    return run(args)


@register("weight_sync")
def weight_sync(args: argparse.Namespace) -> dict:
    from tools.bench_rollout import weight_sync as run

    return run(args)


@register("logprobs")
def logprobs(args: argparse.Namespace) -> dict:
    from tools.bench_logprobs import logprobs as run

    return run(args)


@register("offpolicy")
def offpolicy(args: argparse.Namespace) -> dict:
    from tools.bench_offpolicy import offpolicy as run

    return run(args)


@register("train_mfu")
def train_mfu(args: argparse.Namespace) -> dict:
    from tools.bench_train import train_mfu as run

    return run(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--steps", type=int, help="timed steps per case, median (default 5; grpo_vs_trl --scale realistic: 1)"
    )
    parser.add_argument("--scale", choices=("tiny", "realistic"), default="tiny", help="grpo_vs_trl's size")
    parser.add_argument(
        "--trl-timeout", type=float, default=900, help="grpo_vs_trl --scale realistic: seconds per TRL mode's run"
    )
    parser.add_argument(
        "--cases2",
        nargs="*",
        default=[
            "dense_tp2",
            "dense_pp2",
            "dense_dp2_distopt",
            "dsv3_tp2_sp",
            "dsv3_pp2",
            "dsv3_ep2",
            "dsv3_dp2_distopt",
        ],
    )
    parser.add_argument("--cases4", nargs="*", default=["dsv3_tp2_ep2_sp"])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (grpo_vs_trl, rollout, weight_sync, logprobs)"
    )
    parser.add_argument(
        "--base", help="a pretrain run dir (grpo_vs_trl default: a 300-step pretrain made here; others: random weights)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="offpolicy: runs per mode (seeds 1234, 1235, ...)")
    parser.add_argument("--first-seed", type=int, default=1234, help="offpolicy: the first of the --seeds seeds")
    parser.add_argument(
        "--modes", nargs="*", help="offpolicy: the rollout modes to run (default: all; ratios need sync)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides for rollout, weight_sync, train_mfu, offpolicy, e.g. model.hidden_size=512",
    )
    args = parser.parse_intermixed_args(argv)
    if args.overrides and args.benchmark not in ("rollout", "weight_sync", "train_mfu", "offpolicy"):
        parser.error(f"{args.benchmark} takes no config overrides (got {' '.join(args.overrides)})")
    if args.steps is None:
        args.steps = 1 if args.scale == "realistic" else 5
    start = time.perf_counter()
    result = BENCHMARKS[args.benchmark](args)
    result["meta"] = {
        "benchmark": args.benchmark,
        "wall_s": round(time.perf_counter() - start, 1),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
