"""Checkpoints through megatron dist-checkpointing: saved at one parallel layout, loadable at any other.

Layout on disk: ROOT/step_00000010/ (megatron's sharded files + rng/ + manifest.json + r1stack.json),
and ROOT/latest, a one-line file naming the newest complete step dir. A save writes into
ROOT/.tmp.step_*, fsyncs every file and lists it with its size and sha256 in manifest.json, renames the
dir into place when every rank is done, and only then rewrites `latest`: a save cut short at any point
leaves the previous checkpoint and pointer intact. A load checks the manifest first (the hashing is
split across ranks), so a checkpoint damaged after the fact is refused with the previous one named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from core.data import DataError
from parallel import parallelize as P
from parallel.policy import Policy, unwrap

META = "r1stack.json"
MANIFEST = "manifest.json"
LATEST = "latest"
HEAD_PREFIX = "output_layer."  # what differs between a language model and a reward model
# Optimizer state in a canonical per-parameter form, so it reshards across TP/PP/DP.
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(DataError):  # bad input: rlhf.train reports it as such (exit 2), no traceback
    pass


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _has_optimizer_state(optimizer) -> bool:
    # torch creates Adam's state lazily at the first step; before it there is nothing to save.
    return any(len(getattr(opt, "optimizer", opt).state) for opt in _sub_optimizers(optimizer))


def _sharded_state(policy: Policy, with_optimizer: bool, is_loading: bool) -> dict:
    model_sd = unwrap(policy.chunks[0]).sharded_state_dict(prefix="")
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        if is_loading:
            for opt in _sub_optimizers(policy.optimizer):
                if isinstance(opt, DistributedOptimizer):
                    opt._init_optimizer_states_with_dummy_values()
        state["optimizer"] = policy.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPT_METADATA
        )
    return state


def save(
    policy: Policy,
    root: str | os.PathLike,
    extra: dict | None = None,
    with_optimizer: bool = True,
    keep: int = 0,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final step dir. `files` (each rank's own, under names no
    other rank writes) land in its files/ dir, covered by the manifest like the weights (load returns the
    step dir to read them from)."""
    root = Path(root)
    name = f"step_{policy.step:08d}"
    tmp, final = root / f".tmp.{name}", root / name
    if P.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    P.barrier()
    optimizer_state = with_optimizer and _has_optimizer_state(policy.optimizer)
    dist_checkpointing.save(_sharded_state(policy, optimizer_state, is_loading=False), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{P.rank():05d}.pt")
    if files:
        (tmp / "files").mkdir(exist_ok=True)
        for file_name, data in files.items():
            (tmp / "files" / file_name).write_bytes(data)
    P.barrier()
    manifest = _hash_files(tmp, sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file()), sync=True)
    if P.rank() == 0:
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=0, sort_keys=True))
        meta = {
            "step": policy.step,
            "model": policy.cfg.model.name,
            # The whole architecture: a model read from an HF directory (model=hf) has no preset to name.
            "model_config": dataclasses.asdict(policy.cfg.model),
            "head": policy.head,
            "layout": {k: getattr(policy.cfg.parallel, k) for k in ("tensor", "pipeline", "expert", "data")},
            "world_size": P.world_size(),
            "with_optimizer": with_optimizer,
            "optimizer_state": optimizer_state,  # False before the first step: load leaves it fresh
            "extra": extra or {},
        }
        _fsync_write(tmp / META, json.dumps(meta, indent=1))
        if final.exists():  # re-saving a step: drop the old copy only once the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_write(root / LATEST, name + "\n")
        if keep:
            _prune(root, keep)
    P.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if (p / META).exists())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _hash_files(root: Path, names: list[str], sync: bool = False) -> dict:
    """{name: [size, sha256]} for every file, each rank hashing a strided share; `sync` also fsyncs
    them, so the manifest never lists bytes that a power cut could still lose."""
    mine = {}
    for name in names[P.rank() :: P.world_size()]:
        digest, size = hashlib.sha256(), 0
        with open(root / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
                size += len(chunk)
            if sync:
                os.fsync(f.fileno())
        mine[name] = [size, digest.hexdigest()]
    return {k: v for part in P.gather_world(mine) for k, v in part.items()}


def verify(step_dir: str | os.PathLike) -> list[str]:
    """Collective. What is wrong with a step dir against its manifest: [] when it is intact."""
    step_dir = Path(step_dir)
    if not (step_dir / MANIFEST).exists():
        return [f"{MANIFEST} is missing (an older r1stack wrote it, or something removed it), so it cannot be checked"]
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        return [f"{MANIFEST} is unreadable ({e})"]
    present = {str(f.relative_to(step_dir)) for f in step_dir.rglob("*") if f.is_file()}
    missing = sorted(set(manifest) - present)
    found = _hash_files(step_dir, sorted(set(manifest) & present))
    bad = [
        f"{n}: {found[n][0]} bytes, sha256 {found[n][1][:12]}…; the manifest says {manifest[n][0]} bytes, "
        f"sha256 {manifest[n][1][:12]}…"
        for n in sorted(found)
        if found[n] != manifest[n]
    ]
    return [f"{n} is missing" for n in missing] + bad


def _refuse_corrupt(step_dir: Path, problems: list[str]) -> None:
    root = step_dir.parent
    older = sorted(p.name for p in root.glob("step_*") if (p / META).exists() and p.name < step_dir.name)
    offer = (
        f"The previous checkpoint is {older[-1]}: resume from it with `echo {older[-1]} > {root / LATEST}` "
        f"(or load {root / older[-1]})"
        if older
        else "No earlier checkpoint is kept under " + str(root)
    )
    raise CheckpointError(
        f"checkpoint {step_dir} is damaged: "
        + "; ".join(problems[:5])
        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        + f". {offer}."
    )


def resolve(path: str | os.PathLike) -> Path:
    """A step dir, or a root whose `latest` names one."""
    path = Path(path)
    if (path / META).exists():
        return path
    pointer = path / LATEST
    if not pointer.exists():
        raise CheckpointError(f"no checkpoint at {path}: neither {META} nor a '{LATEST}' pointer is there")
    step_dir = path / pointer.read_text().strip()
    if not (step_dir / META).exists():
        raise CheckpointError(f"{pointer} names {step_dir.name}, which is missing or incomplete")
    return step_dir


def load_frozen(cfg, path: str | os.PathLike, head: str, what: str, tok) -> tuple[Policy, dict]:
    """Collective. Another model for scoring (a reward model, a distillation teacher, a judge): built at this
    run's parallel layout but with the architecture its checkpoint recorded, weights only; or an HF model
    directory (a language model), imported. `what` names the config key
    in errors; a model trained with another tokenizer than `tok` (this run's) is refused. Returns the model
    and the checkpoint's metadata."""
    from core.errors import ConfigError
    from core.run_tokenizer import require_same, tokenizer_dir_of
    from parallel.policy import build_policy

    require_same(tok, "this run", tokenizer_dir_of(path), f"{what}={path}")
    if is_hf_dir(path):
        return _load_frozen_hf(cfg, path, head, what), {"head": head, "imported_from": str(path)}
    step_dir = resolve(of_run(path))
    meta = read_meta(step_dir)
    saved = meta.get("head", "lm")
    if saved != head:
        kind = {"lm": "language model", "scalar": "reward model"}
        raise ConfigError(
            f"{what}={path}: {step_dir} holds a {kind.get(saved, saved)}, not a {kind.get(head, head)}. "
            "Fix: point it at a run of the right stage."
        )
    model_cfg = saved_model_config(meta, cfg.model)
    model = build_policy(dataclasses.replace(cfg, model=model_cfg), with_optimizer=False, head=head)
    load(model, step_dir, with_optimizer=False)
    return model, meta


def _load_frozen_hf(cfg, path, head: str, what: str) -> Policy:
    """An HF model directory as a frozen language model (a teacher, a judge): its config.json's architecture,
    its weights imported through megatron-bridge at this run's layout."""
    from core.config import ModelConfig
    from core.errors import ConfigError
    from parallel import hf_bridge
    from parallel.hf_arch import merge_model
    from parallel.policy import build_policy

    if head != "lm":
        raise ConfigError(
            f"{what}={path} is a Hugging Face model directory, a language model; a reward model here is a run "
            "of stage=reward_model (its scalar head). Fix: train one with stage=reward_model and name its run dir."
        )
    model_cfg = ModelConfig(**merge_model(str(path), {"name": "hf", "path": str(path)}))
    model = build_policy(dataclasses.replace(cfg, model=model_cfg), with_optimizer=False, head=head)
    hf_bridge.import_hf(model, path)
    return model


def saved_model_config(meta: dict, current):
    """The ModelConfig a checkpoint was saved with (`current` when it is that one). Checkpoints from before
    model_config was recorded name their preset only."""
    from core.compose import model_preset
    from core.config import ModelConfig

    if meta.get("model_config"):
        saved = ModelConfig(**meta["model_config"])
        return current if saved == current else saved
    preset = meta.get("model") or current.name
    return current if preset == current.name else model_preset(preset)


def resume(policy: Policy, run_dir: str | os.PathLike, init_from: str | None) -> dict | None:
    """Collective. Where a stage's policy starts: its own latest checkpoint under RUN_DIR/checkpoints
    (weights, optimizer and RNG: the run resumes where it stopped), else `init_from`'s weights (a fresh
    optimizer at step 0), else its initialisation. Returns the resumed checkpoint's metadata, None otherwise."""
    root = Path(run_dir) / "checkpoints"
    if (root / LATEST).exists():
        return load(policy, root, with_optimizer=True, with_rng=True)
    if init_from:
        load_weights(policy, init_from)
        policy.step = 0
    return None


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory (config.json + safetensors), not one of our run or checkpoint dirs."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors")) and not (p / META).exists()


def load_weights(policy: Policy, path: str | os.PathLike) -> None:
    """Collective. Weights only, from what a stage's init_from may name: a run dir, a checkpoint root or step
    dir, or an HF model directory (imported through megatron-bridge at this run's layout)."""
    if is_hf_dir(path):
        from parallel import hf_bridge

        hf_bridge.import_hf(policy, path)
    else:
        load(policy, of_run(path), with_optimizer=False)


def of_run(path: str | os.PathLike) -> Path:
    """What a stage's `init_from` names: a run dir holding checkpoints/, or a checkpoint root or step dir."""
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints" / LATEST).exists() else p


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((resolve(path) / META).read_text())


def load(policy: Policy, path: str | os.PathLike, with_optimizer: bool = True, with_rng: bool = False) -> dict:
    """Collective. Loads weights (and optimizer state) saved at any layout; returns the metadata."""
    step_dir = resolve(path)
    problems = verify(step_dir)
    if problems:
        _refuse_corrupt(step_dir, problems)
    meta = json.loads((step_dir / META).read_text())
    if with_optimizer and not meta["with_optimizer"]:
        raise CheckpointError(f"{step_dir} holds weights only; load it with with_optimizer=False")
    with_optimizer = with_optimizer and meta["optimizer_state"]
    body_only = _body_only(step_dir, meta.get("head", "lm"), policy.head, with_optimizer)
    sharded = _sharded_state(policy, with_optimizer, is_loading=True)
    if body_only:
        sharded["model"] = {k: v for k, v in sharded["model"].items() if not k.startswith(HEAD_PREFIX)}
    try:
        state = dist_checkpointing.load(sharded, str(step_dir))
    except (Exception, CheckpointException) as e:  # torch's message is a traceback per rank: say what it means
        raise _unloadable(step_dir, meta, policy, e) from e
    missing, unexpected = unwrap(policy.chunks[0]).load_state_dict(state["model"], strict=not body_only)
    if unexpected or any(not k.startswith(HEAD_PREFIX) for k in missing):
        raise CheckpointError(f"{step_dir}: weights missing {missing} or unexpected {unexpected}")
    if with_optimizer:
        policy.optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(policy.optimizer)
    if with_rng:
        rng_file = step_dir / "rng" / f"rank_{P.rank():05d}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    policy.step = meta["step"]
    if with_optimizer and policy.scheduler is not None:  # the schedule is a function of the step
        policy.scheduler.num_steps = 0
        policy.scheduler.step(increment=policy.step)
    return {**meta, "step_dir": str(step_dir)}


def _body_only(step_dir: Path, saved: str, here: str, with_optimizer: bool) -> bool:
    """A reward model starts from a language model's weights (its body; the scalar head is new); the
    other way round, and resuming an optimizer across heads, make no sense."""
    if saved == here:
        return False
    if saved == "lm" and here == "scalar" and not with_optimizer:
        return True
    raise CheckpointError(
        f"{step_dir} holds a {saved!r}-head model (reward model: 'scalar'), this run builds a "
        f"{here!r}-head one. Fix: point it at a checkpoint of the same kind."
    )


def _unloadable(step_dir: Path, meta: dict, policy: Policy, error: BaseException) -> CheckpointError:
    failure = next(iter(getattr(error, "failures", {}).values()), None)  # torch's CheckpointException: per rank
    cause = failure[0] if isinstance(failure, tuple) and failure else error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else type(cause).__name__
    detail = detail if len(detail) <= 200 else detail[:200] + "…"
    saved, here = meta.get("model"), policy.cfg.model.name
    return CheckpointError(
        f"cannot load {step_dir} (saved from model '{saved}') into this run's model '{here}': {detail}. Fix: run "
        f"with the model it was saved from (model={saved} and the same model.* overrides), or point "
        "stage.init_from at a checkpoint of this model."
    )


def _unshare_adam_steps(optimizer) -> None:
    # Upstream bug: DistributedOptimizer.load_state_dict hands every param one shared `step` tensor,
    # so each Adam update bumps it once per param and bias correction goes wrong silently.
    for opt in _sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].clone()


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_parallel_layout() -> dict:
    return {
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "expert": ps.get_expert_model_parallel_world_size(),
        "data": ps.get_data_parallel_world_size(),
    }
