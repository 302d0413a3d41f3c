"""Checks a launch before any task starts: the overrides compose and the parallel layout fits the task
count. The Slurm scripts run it ahead of `srun`, so a wrong `--ntasks` stops at once with one message.

    python -m tools.check_launch NTASKS [Hydra overrides]    # exit 0, or 2 with the fix on stderr
"""

from __future__ import annotations

import sys

from core.compose import compose
from core.errors import ConfigError
from core.validate import validate


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m tools.check_launch NTASKS [Hydra overrides]", file=sys.stderr)
        return 2
    tasks, overrides = int(argv[0]), argv[1:]
    try:
        cfg = validate(compose(overrides), tasks)
    except ConfigError as e:
        print(f"config error for {tasks} task(s): {e}", file=sys.stderr)
        if "world size" in str(e):
            print(
                "Fix: change the task count (sbatch --nodes/--ntasks-per-node) or the layout (parallel=... "
                "or parallel.tensor/pipeline/data=...).",
                file=sys.stderr,
            )
        return 2
    p = cfg.parallel
    print(
        f"ok: {tasks} task(s) = tensor {p.tensor} × pipeline {p.pipeline} × context {p.context} × data {p.data}"
        f" (expert {p.expert}), stage {cfg.stage.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
