"""`python -m rlhf.train` that SIGKILLs itself inside a checkpoint save, for the kill -9 resume tests.

    python tests/dist/crash_run.py POINT STEP [rlhf.train overrides]

POINT: `shards` (the save of policy step STEP has written its shard files, nothing else) or `pointer`
(the step dir is renamed into place, `latest` is not yet rewritten). The kill is real: no cleanup runs.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    import parallel  # noqa: F401  (the CPU compatibility layer before megatron loads)
    from parallel import checkpoint as ckpt

    if point == "shards":
        real_save = ckpt.dist_checkpointing.save

        def save_then_die(state, path, **kw):
            real_save(state, path, **kw)
            if Path(path).name == f".tmp.step_{step:08d}":
                die()

        ckpt.dist_checkpointing.save = save_then_die
    elif point == "pointer":
        real_write = ckpt._fsync_write

        def write_unless_pointer(path, text):
            if path.name == ckpt.LATEST and text.strip() == f"step_{step:08d}":
                die()
            real_write(path, text)

        ckpt._fsync_write = write_unless_pointer
    else:
        sys.exit(f"unknown crash point {point!r}: use shards or pointer")


if __name__ == "__main__":  # reward workers re-import this module: arm and run only in the trainer
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    arm(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["rlhf.train", *sys.argv[3:]]
    runpy.run_module("rlhf.train", run_name="__main__")
