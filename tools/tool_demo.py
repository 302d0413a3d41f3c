"""The tool-integrated reasoning demo's learning table: does GRPO teach the tiny model to use the Python tool?

    python -m tools.tool_demo [--out runs/tool_demo] [--seeds 1234 1235] [--steps 80]

Pretrains a base on 3-digit multiplication (data=multiplication: 10% of its texts call the tool), then runs
the same GRPO twice per seed: with the tool (rollout.max_tool_calls=1) and without it (the tags are then
ordinary tokens and the model writes the "output" itself). Each run's held-out evaluation (100 prompts,
eval.k samples) is before and after RL; the gain with the tool minus the gain without it is the tool's
share. Writes OUT/summary.json and prints a markdown table. Finished runs are not redone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# Room for a call, its output and the answer (~35 tokens) after the 27-token prompt.
RL = ["stage=r1_zero", "data=multiplication", "rollout.max_new_tokens=64", "stage.train.seq_length=96", "logger=none"]
# reasoning_first: the share of samples that open with a call (written, whether or not a tool runs it)
REPORTED = (
    "pass@1",
    "format",
    "reasoning_first",
    "tool_use",
    "tool_use_correct",
    "tool_calls",
    "tool_errors",
    "response_length",
)


def train(*overrides: str) -> None:
    subprocess.run([sys.executable, "-m", "rlhf.train", *overrides], check=True)


def run_all(out: Path, seeds: list[int], steps: int) -> dict:
    base = out / "pretrain"
    if not (base / "checkpoints").is_dir():
        train("stage=pretrain", "data=multiplication", f"run_dir={base}", "logger=none")
    runs = {}
    for seed in seeds:
        for calls, name in ((1, "with_tool"), (0, "without_tool")):
            run = out / f"{name}_seed{seed}"
            if not (run / "eval.json").is_file():
                train(*RL, f"stage.init_from={base}", f"rollout.max_tool_calls={calls}", f"seed={seed}",
                      f"stage.train.steps={steps}", f"run_dir={run}")  # fmt: skip
            evals = json.loads((run / "eval.json").read_text())
            runs[run.name] = {
                "tool": bool(calls),
                "seed": seed,
                **{f"base_{k}": evals["base"].get(k) for k in REPORTED},
                **{f"final_{k}": evals["final"].get(k) for k in REPORTED},
                "gain_points": 100 * (evals["final"]["pass@1"] - evals["base"]["pass@1"]),
            }
    margins = [runs[f"with_tool_seed{s}"]["gain_points"] - runs[f"without_tool_seed{s}"]["gain_points"] for s in seeds]
    summary = {"steps": steps, "seeds": seeds, "runs": runs, "tool_margin_points": margins}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(summary: dict) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    lines = [
        "| run | seed | pass@1 base → RL | writes a call first | tool ran | ran, no error, right answer "
        "| tool errors/sample | gain (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["runs"].items():
        lines.append(
            f"| {name.rsplit('_seed', 1)[0]} | {r['seed']} | {pct(r['base_pass@1'])} → {pct(r['final_pass@1'])} | "
            f"{pct(r['base_reasoning_first'])} → {pct(r['final_reasoning_first'])} | "
            f"{pct(r['base_tool_use'])} → {pct(r['final_tool_use'])} | {pct(r['base_tool_use_correct'])} → "
            f"{pct(r['final_tool_use_correct'])} | {r['final_tool_errors'] if r['tool'] else '—'} | "
            f"{r['gain_points']:+.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/tool_demo"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    p.add_argument("--steps", type=int, default=80)
    args = p.parse_args(argv)
    summary = run_all(args.out, args.seeds, args.steps)
    print(table(summary))
    print(f"tool margin (gain with − gain without), points: {summary['tool_margin_points']}")


if __name__ == "__main__":
    main(sys.argv[1:])
