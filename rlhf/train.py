"""Entry point for every stage: `python -m rlhf.train stage=pretrain run_dir=PATH [overrides]`.

Exit status 2 means the configuration (or a data file it names) cannot run; the message on stderr
names the key and the fix. Exit status 75 means the run was preempted (SIGUSR1 or SIGTERM) and left a
checkpoint: the same command resumes it (rlhf/preempt.py).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from core.config import ConfigError, compose, load_config, register_schema
from core.data import DataError
from rlhf.preempt import REQUEUE_EXIT, Preempted

register_schema()  # before @hydra.main composes conf/config.yaml, whose defaults name the schema


def _pretrain(cfg):
    from rlhf import pretrain  # imports megatron: only once a stage actually runs

    return pretrain.run(cfg)


def _sft(cfg):
    from rlhf import sft

    return sft.run(cfg)


def _cold_start_sft(cfg):
    from rlhf import cold_start

    return cold_start.run(cfg)


def _reward_model(cfg):
    from rlhf import reward_model

    return reward_model.run(cfg)


def _rejection_sampling(cfg):
    from rlhf import rejection_sampling

    return rejection_sampling.run(cfg)


def _r1_zero(cfg):
    from rlhf import r1_zero

    return r1_zero.run(cfg)


# reasoning_rl, general_rl (R1 stages 2 and 4) and on_policy_distill are the GRPO loop of r1_zero, distill the
# SFT of sft; their configs differ.
STAGES = {
    "pretrain": _pretrain,
    "sft": _sft,
    "cold_start_sft": _cold_start_sft,
    "r1_zero": _r1_zero,
    "reasoning_rl": _r1_zero,
    "general_rl": _r1_zero,
    "on_policy_distill": _r1_zero,
    "rejection_sampling": _rejection_sampling,
    "distill": _sft,
    "reward_model": _reward_model,
}


def run_stage(cfg) -> dict:
    runner = STAGES.get(cfg.stage.name)
    if runner is None:
        raise ConfigError(f"unknown stage.name {cfg.stage.name!r}. Fix: use one of {sorted(STAGES)}.")
    return runner(cfg)


def _fail(e: Exception) -> None:
    kind = "config" if isinstance(e, ConfigError) else "checkpoint" if type(e).__name__ == "CheckpointError" else "data"
    print(f"{kind} error: {e}", file=sys.stderr)
    sys.exit(2)


def _runtime_failure(e: Exception) -> None:
    """An engine that died or hung (exit 1) and a reward sandbox the machine refuses (exit 2) end with
    their message, not a traceback; anything else is a bug and keeps its traceback."""
    from inference.engine import EngineError  # imports torch: only on this path
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
    composing the plain overrides first turns that into our message and status 2."""
    if any(a.startswith("-") for a in argv):  # --multirun, --cfg, ...: leave those to Hydra
        return
    try:
        compose([a for a in argv if not a.lstrip("+~").startswith("hydra.")])
    except ConfigError as e:
        _fail(e)


if __name__ == "__main__":
    if os.environ.get("R1_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["R1_THREADS"]))
    _precheck(sys.argv[1:])
    main()
