"""The one way a stage logs metrics: a JSON line per step in RUN_DIR/metrics.jsonl, mirrored to W&B.

    with Tracker(cfg, run_dir, enabled=rank == 0) as tracker:
        tracker.trim(start_step)          # on resume: drop the steps the last checkpoint never saw
        for step in ...:
            tracker.log({"step": step, "train/loss": loss, ...})
        tracker.summary({"final_loss": loss})

metrics.jsonl is strict JSON (NaN and ±inf are written as null) and is flushed every step, so a killed run
keeps every step it logged. W&B mirroring follows `logger.backend=wandb` with `logger.mode` offline
(default; the run lands in RUN_DIR/wandb/, upload later with `wandb sync`), online, or disabled. The W&B
run id lives in RUN_DIR/wandb_id.txt and the run is opened with resume="allow", so re-running the same
command continues the same W&B run; offline, each resumed segment is its own folder with that id
(`wandb sync --id $(cat RUN_DIR/wandb_id.txt) RUN_DIR/wandb/offline-run-*` uploads them in order).
The resolved config and the code's git commit go to RUN_DIR/config.json and to the W&B run's config.
On ranks other than 0 (`enabled=False`) every method is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import secrets
import string
import subprocess
from pathlib import Path
from typing import Any

from core.errors import ConfigError

log = logging.getLogger("r1stack.tracking")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPO = Path(__file__).resolve().parents[1]
WANDB_ID_FILE = "wandb_id.txt"
BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")


class TrackingError(ConfigError):
    """The metrics backend cannot start; the message names the logger setting that avoids it."""


def clean(v: Any) -> Any:
    """A JSON-safe copy: non-finite floats become None, 0-d tensors/numpy scalars become Python numbers."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / torch scalar
        return clean(v.item())
    if isinstance(v, numbers.Real):
        return clean(float(v))
    return str(v)


def _number(v: Any) -> int | float | None:
    """The value as W&B gets it (NaN stays NaN, bools become 0/1), or None when it is not numeric."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    return v if isinstance(v, (int, float)) else None


class Tracker:
    """Metrics of one stage run in RUN_DIR (see the module docstring); `enabled=False` on ranks other than 0."""

    def __init__(self, cfg, run_dir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.wandb_run = None  # the wandb Run when mirroring, else None
        self._file = None
        self._wandb_next_step = 0  # W&B steps must not go back: a resumed online run starts past its last one
        if not enabled:
            return
        backend, mode = cfg.logger.backend, cfg.logger.mode
        if backend not in BACKENDS:
            raise ConfigError(f"logger.backend={backend!r}. Fix: use logger=wandb or logger=none.")
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r}. Fix: use one of {list(MODES)}.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(json.dumps(clean(run_config(cfg)), indent=1) + "\n")
        if backend == "wandb" and mode != "disabled":
            self.wandb_run = _init_wandb(cfg, self.run_dir)
            self._wandb_next_step = self.wandb_run.step

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    # ------------------------------------------------------------ per step

    def log(self, row: dict) -> None:
        """Appends `row` (which must hold an int "step") to metrics.jsonl and flushes it; its numeric
        values also go to W&B at that step. Strings, lists and other values go to metrics.jsonl only."""
        if "step" not in row:
            raise ValueError(f"Tracker.log: the row has no 'step' key (keys: {sorted(row)})")
        if not self.enabled:
            return
        line = json.dumps(clean(row), allow_nan=False)
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(line + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            step = int(row["step"])
            numeric = {k: x for k, x in ((k, _number(v)) for k, v in row.items() if k != "step") if x is not None}
            # A step below the run's current one (the part of a killed run past its last checkpoint, already
            # in W&B when online) would be dropped by W&B with a warning; skip it here instead.
            if numeric and step >= self._wandb_next_step:
                self.wandb_run.log(numeric, step=step)
                self._wandb_next_step = step

    def trim(self, after_step: int) -> None:
        """Drops metrics.jsonl lines with step > after_step: a killed run logs steps its last checkpoint
        never saw, and the resumed run logs them again. A line that is not a JSON object (the torn last line
        of a run killed mid-write) goes too, with a warning."""
        if not self.enabled:
            return
        self._close_file()
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                log.warning("%s line %d is not a JSON object; dropped on resume", self.path, i)
                continue
            if step is None or step <= after_step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    # ------------------------------------------------------------ end of run

    def summary(self, values: dict) -> None:
        """Sets the W&B run summary (final and eval numbers); a no-op without W&B."""
        if self.enabled and self.wandb_run is not None:
            self.wandb_run.summary.update(clean(values))

    def finish(self, exit_code: int = 0) -> None:
        self._close_file()
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.finish(exit_code=exit_code)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def git_state() -> dict:
    """The commit the code runs at, and whether the tree had uncommitted changes."""

    def git(*args):
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        return {
            "commit": commit,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        }
    except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung filesystem
        return {"commit": None, "dirty": None}


def run_config(cfg) -> dict:
    return {**_config_dict(cfg), "git": git_state()}


def _config_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _init_wandb(cfg, run_dir: Path):
    os.environ.setdefault("WANDB_SILENT", "true")  # before the import: no banners or sync hints on stdout
    import wandb

    lg = cfg.logger
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        run = wandb.init(
            mode=lg.mode,
            project=lg.project,
            entity=lg.entity,
            dir=str(run_dir),
            name=run_dir.resolve().name,
            config=clean(run_config(cfg)),
            id=run_id,
            resume="allow",
            # console="off": leave stdout/stderr (and the progress bar) alone.
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as e:  # noqa: BLE001  (wandb raises many types: UsageError, CommError, timeouts, ...)
        raise TrackingError(
            f"W&B init failed with logger.mode={lg.mode} ({type(e).__name__}: {e}). "
            "Fix: use logger.mode=offline (upload later with `wandb sync`) or logger=none."
        ) from e
    id_file.write_text(run.id + "\n")
    return run
