"""The end of `make demo`: the held-out numbers of the base and the R1-Zero model, side by side.

python -m tools.demo_summary runs/demo     (reads pretrain/ and r1_zero/, writes summary.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(root: Path) -> dict:
    evals = json.loads((root / "r1_zero" / "eval.json").read_text())
    base, final = evals["base"], evals["final"]
    k = final["k"]
    summary = {
        "base_pass@1": base["pass@1"],
        "r1_zero_pass@1": final["pass@1"],
        "gain_points": 100 * (final["pass@1"] - base["pass@1"]),
        f"base_cons@{k}": base[f"cons@{k}"],
        f"r1_zero_cons@{k}": final[f"cons@{k}"],
        "base_format": base["format"],
        "r1_zero_format": final["format"],
        "base_response_length": base["response_length"],
        "r1_zero_response_length": final["response_length"],
        "eval": {key: final[key] for key in ("n_prompts", "k", "temperature", "top_p")},
    }
    if "reasoning_first" in base:
        summary["base_reasoning_first"], summary["r1_zero_reasoning_first"] = (
            base["reasoning_first"],
            final["reasoning_first"],
        )
    for stage in ("pretrain", "r1_zero"):
        lines = (root / stage / "metrics.jsonl").read_text().splitlines()
        summary[f"{stage}_steps"] = len(lines)
    return summary


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "runs/demo")
    summary = summarize(root)
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    e = summary["eval"]
    print(
        f"\nheld-out 3-digit addition, {e['n_prompts']} prompts × k={e['k']} samples (T={e['temperature']}, top-p {e['top_p']}):"
    )
    print(
        f"  pass@1   base {summary['base_pass@1']:.3f}  →  R1-Zero {summary['r1_zero_pass@1']:.3f}"
        f"   ({summary['gain_points']:+.1f} points)"
    )
    print(f"  format   base {summary['base_format']:.3f}  →  R1-Zero {summary['r1_zero_format']:.3f}")
    print(
        f"  length   base {summary['base_response_length']:.1f}  →  R1-Zero {summary['r1_zero_response_length']:.1f} tokens"
    )
    print(f"report: {root / 'r1_zero' / 'report.html'}   summary: {root / 'summary.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
