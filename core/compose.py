"""From conf/ and command-line overrides to a typed Config: Hydra composition onto the schema
(core.config), with composition errors translated into ones that name the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from core.config import Config, ModelConfig
from core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HF_PRESET = "hf"  # conf/model/hf.yaml: the architecture is model.path's config.json


def load_config(raw: DictConfig | dict[str, Any]) -> Config:
    """Merges composed YAML onto the schema; unknown keys and wrong types become a ConfigError."""
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    # Untyped first: a node Hydra already typed would let `+new_key` overrides through the merge.
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=False))
    _architecture_from_hf_dir(raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise explain(e) from None
    return cfg


def _architecture_from_hf_dir(raw: DictConfig) -> None:
    """model.path=DIR: the model group's architecture fields become DIR/config.json's. Read through
    megatron-bridge (parallel.hf_arch), so it is imported only when a model directory is named."""
    model = raw.get("model") or {}
    path = None if OmegaConf.is_missing(model, "path") else model.get("path")
    if path is None:
        if model.get("name") == HF_PRESET:
            raise ConfigError(f"model={HF_PRESET} reads a Hugging Face model directory. Fix: add model.path=DIR.")
        return
    import parallel  # noqa: F401  (CPU compatibility layer before megatron-bridge loads)
    from parallel.hf_arch import merge_model

    raw.model = merge_model(str(path), OmegaConf.to_container(raw.model, resolve=False))


def explain(error: Exception) -> ConfigError:
    """Turns an OmegaConf/Hydra composition error into one naming the key and the fix."""
    cause = error
    while not isinstance(cause, OmegaConfBaseException) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None) or getattr(cause, "key", None) or "?"
    missing = re.search(r"Could not find '(\w+)/(\w+)'", str(error))
    if missing:
        group, name = missing.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        return ConfigError(f"no preset '{name}' in config group '{group}'. Fix: use one of {options}.")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(
            f"unknown config key '{key}'. Fix: check the spelling against conf/ and core/config.py "
            "(every valid key is a dataclass field there), or remove it."
        )
    if isinstance(cause, ValidationError):
        return ConfigError(f"bad value for config key '{key}': {str(cause).splitlines()[0]}")
    return ConfigError(str(error).splitlines()[0])


def register_schema() -> None:
    """Makes the dataclasses the base of conf/config.yaml, so every field is overridable by name."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=Config)


def model_preset(name: str) -> ModelConfig:
    """conf/model/NAME.yaml alone (a checkpoint records the preset it was trained with)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no model preset {name!r} (conf/model/{name}.yaml). Fix: use one of {options}.")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """The config a `python -m ... [overrides]` run would get, outside of @hydra.main (tests, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        try:
            raw = hydra_compose(config_name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            raise explain(e) from None
    return load_config(raw)
