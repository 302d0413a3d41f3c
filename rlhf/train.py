"""Entry point for every stage: `python -m rlhf.train stage=pretrain run_dir=PATH [overrides]`.

Exit status 2 means the configuration (or a data file it names) cannot run; the message on stderr
names the key and the fix. Exit status 75 means the run was preempted (SIGUSR1 or SIGTERM) and left a
checkpoint: the same command resumes it (rlhf/preempt.py).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from core.compose import compose, load_config, register_schema
from core.data import DataError
from core.errors import ConfigError
from core.stages import STAGES
from rlhf.preempt import REQUEUE_EXIT, Preempted

register_schema()  # before @hydra.main composes conf/config.yaml, whose defaults name the schema


def run_stage(cfg) -> dict:
    """Checks every name the config gives an extension point, then runs the stage."""
    stage = STAGES.get(cfg.stage.name)
    check_names(cfg)
    return importlib.import_module(stage.module).run(cfg)  # imports megatron: only once a stage runs


def check_names(cfg) -> None:
    """ConfigError for a name no registry has, before any model is built or prompt generated (a bad
    stage.rl.advantage would otherwise fail after the base evaluation and the first rollout)."""
    from inference.engine import ENGINES
    from rlhf.rewards import REWARDS
    from rlhf.tasks import TASKS

    stage = STAGES.get(cfg.stage.name)
    d = cfg.data
    if d.source == "generated":
        TASKS.check(d.task)
    if d.general_task:
        TASKS.check(d.general_task, "data.general_task")
    if stage.loop in ("grpo", "sampling"):
        ENGINES.check(cfg.rollout.engine)
        if cfg.rollout.max_tool_calls:
            from rlhf import tool_calls

            tool_calls.check_config(cfg.rollout)
        for key, weights in (("weights", cfg.reward.weights), ("general_weights", cfg.reward.general_weights)):
            for name in weights:
                REWARDS.check(name, f"reward.{key}.{name}")
    if stage.loop == "grpo":
        from rlhf import advantages, losses

        advantages.ADVANTAGES.check(cfg.stage.rl.advantage)
        losses.check_names(cfg.stage.rl)


def _fail(e: Exception) -> None:
    kind = "config" if isinstance(e, ConfigError) else "checkpoint" if type(e).__name__ == "CheckpointError" else "data"
    print(f"{kind} error: {e}", file=sys.stderr)
    sys.exit(2)


def _runtime_failure(e: Exception) -> None:
    """An engine that died or hung (exit 1) and a reward sandbox the machine refuses (exit 2) end with
    their message, not a traceback; anything else is a bug and keeps its traceback."""
    from inference.supervision import EngineError
    from rlhf.rewards.sandbox import SandboxUnavailable

    if isinstance(e, EngineError):
        print(f"engine error: {e}", file=sys.stderr)
        sys.exit(1)
    if isinstance(e, SandboxUnavailable):
        print(f"sandbox error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter and config field
    _per_job_run_dir(raw)
    try:
        cfg = load_config(raw)
        run_stage(cfg)
    except (ConfigError, DataError) as e:
        _fail(e)
    except Preempted as e:
        print(f"preempted: {e}. Exit {REQUEUE_EXIT}: run the same command to resume.", file=sys.stderr)
        sys.exit(REQUEUE_EXIT)
    except Exception as e:
        _runtime_failure(e)
        raise


def _per_job_run_dir(raw: DictConfig) -> None:
    """In a sweep (`-m`) every job gets its own run_dir: RUN_DIR/sweep/<job number>, where Hydra puts
    that job's files; otherwise all jobs would share checkpoints and metrics."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        raw.run_dir = hc.runtime.output_dir


def _precheck(argv: list[str]) -> None:
    """Hydra rejects an unknown override key before `main` runs, with its own message and status 1;
    composing the plain overrides first turns that into our message and status 2, and a name no registry
    has fails here too, before Hydra creates the run dir."""
    if any(a.startswith("-") for a in argv):  # --multirun, --cfg, ...: leave those to Hydra
        return
    try:
        check_names(compose([a for a in argv if not a.lstrip("+~").startswith("hydra.")]))
    except ConfigError as e:
        _fail(e)


if __name__ == "__main__":
    if os.environ.get("R1_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["R1_THREADS"]))
    _precheck(sys.argv[1:])
    main()
