"""HF <-> Megatron weight conversion for our policy, through megatron-bridge 0.6.2's model bridges.

    import_hf(policy, hf_dir)            HF safetensors -> this rank's shards (any TP/PP/EP layout)
    export_hf(policy)                    -> iterator of (hf_name, full tensor), on every rank (vLLM sync)
    save_hf(policy, out_dir, tokenizer)  config.json + model.safetensors that transformers and vLLM load

Only the bridge's conversion core and the qwen2 / qwen3 / llama / deepseek_v3 bridges are imported, without
Transformer Engine ever becoming importable (see `import_bridges`). Adaptations to our GPTModel, each
with its reason, are marked "why:" below.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Iterable, Iterator

import torch

import parallel  # noqa: F401  (CPU compatibility layer, incl. the CPU torch for megatron.bridge, first)
from core.hf_config import hf_config as make_hf_config

_BARE_PACKAGES = (
    "megatron.bridge",
    "megatron.bridge.models",
    "megatron.bridge.models.qwen",
    "megatron.bridge.models.deepseek",
    "megatron.bridge.models.llama",
)
FAMILY_MODULES = {
    "qwen2": ("megatron.bridge.models.qwen.qwen2_bridge", "Qwen2Bridge"),
    "qwen3": ("megatron.bridge.models.qwen.qwen3_bridge", "Qwen3Bridge"),
    "deepseek_v3": ("megatron.bridge.models.deepseek.deepseek_v3_bridge", "DeepSeekV3Bridge"),
    "llama": ("megatron.bridge.models.llama.llama_bridge", "LlamaBridge"),
}


def _bridge_root() -> Path:
    spec = importlib.machinery.PathFinder.find_spec("megatron", None)
    for loc in spec.submodule_search_locations or []:
        if (Path(loc) / "bridge" / "models" / "conversion" / "model_bridge.py").exists():
            return Path(loc) / "bridge"
    raise ImportError("megatron-bridge is not installed (no megatron/bridge on sys.path)")


def _bare_package(name: str, path: Path) -> types.ModuleType:
    """A package module with the right __path__ whose __init__.py is NOT executed."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path / "__init__.py")
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


class _Placeholder(type):
    """Any attribute of the placeholder transformer_engine: a class nothing is an instance of, whose
    own attributes are again such classes (so `te.ops.Sequential` in an annotation resolves) and
    which cannot be instantiated."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__name__}: transformer_engine is not installed (placeholder for megatron-bridge)")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", (), {})


@contextlib.contextmanager
def _transformer_engine_visible_briefly():
    names = ("transformer_engine", "transformer_engine.pytorch")
    assert not any(n in sys.modules for n in names), "a real or stub transformer_engine is already imported"
    te = _PlaceholderModule("transformer_engine")
    te.pytorch = _PlaceholderModule("transformer_engine.pytorch")
    sys.modules.update({"transformer_engine": te, "transformer_engine.pytorch": te.pytorch})
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


def _import_lora_layers_without_te() -> None:
    """megatron.bridge.peft.lora_layers with a placeholder `te`; nothing else sees transformer_engine."""
    name = "megatron.bridge.peft.lora_layers"
    if name in sys.modules:
        return
    if "transformer_engine" in sys.modules or importlib.util.find_spec("transformer_engine") is not None:
        importlib.import_module(name)  # a real Transformer Engine (GPU venv): nothing to hide
        return
    # Everything lora_layers imports after its TE line, imported first while TE is absent.
    importlib.import_module("megatron.core.transformer.moe.moe_utils")
    importlib.import_module("megatron.bridge.peft.adapter_wrapper")
    importlib.import_module("megatron.bridge.peft.lora_merge")
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _transformer_engine_visible_briefly():
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _bare_megatron_training() -> None:
    """`megatron.training` (Megatron-LM's training loop, shipped in the megatron-core wheel) without its
    __init__, which imports the whole training stack; megatron.training.utils.common_utils only needs
    get_adlr_autoresume/get_args/get_timers from it, which live in megatron.training.global_vars."""
    if "megatron.training" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("megatron", None)
    for loc in spec.submodule_search_locations or []:
        if (Path(loc) / "training" / "global_vars.py").exists():
            pkg = _bare_package("megatron.training", Path(loc) / "training")
            gv = importlib.import_module("megatron.training.global_vars")
            for n in (
                "get_args",
                "get_timers",
                "get_adlr_autoresume",
                "get_signal_handler",
                "get_tokenizer",
                "get_tensorboard_writer",
                "get_wandb_writer",
                "get_one_logger",
            ):
                setattr(pkg, n, getattr(gv, n))
            return
    raise ImportError("megatron.training not found next to megatron.core")


def _alias_typing_override() -> None:
    """megatron.training.models (reached via megatron.bridge.models.common.base) does
    `from typing import override`, new in Python 3.12; typing_extensions has the same decorator."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


_BRIDGES: dict[str, type] = {}


def import_bridges(families: Iterable[str] = ("qwen2", "deepseek_v3")) -> dict[str, type]:
    """{family: MegatronModelBridge subclass}, importing only what those families need."""
    families = tuple(f for f in families if f not in _BRIDGES)
    if families:
        _alias_typing_override()
        root = _bridge_root()
        for name in _BARE_PACKAGES:
            _bare_package(name, root.joinpath(*name.split(".")[2:]))
        _bare_megatron_training()
        _import_lora_layers_without_te()
        for family in families:
            module_name, cls_name = FAMILY_MODULES[family]
            _BRIDGES[family] = getattr(importlib.import_module(module_name), cls_name)
        _register_local_spec_modules()
    return dict(_BRIDGES)


def _register_local_spec_modules() -> None:
    """r1stack's local spec uses megatron.core.post_training.modelopt.layers.Linear (class name 'Linear',
    a TP-duplicated full weight) for the MLA down-projections; AutoMapping only knows TE's/ parallel
    linears by class name and raises 'Cannot determine parallelism type for module 'Linear''. Our norms are
    torch.nn.RMSNorm ('RMSNorm', already known as replicated)."""
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    AutoMapping.register_module_type("Linear", "replicated")


# ---------------------------------------------------------------------------------------------------
# Conversion API over MegatronModelBridge (load_weights_hf_to_megatron / stream_weights_megatron_to_hf).

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


class HFState:
    """What MegatronModelBridge reads from an HF source: .config and .state (the bridge's StateDict)."""

    def __init__(self, config, state_dict: dict[str, torch.Tensor], name: str = "<in-memory>"):
        from megatron.bridge.models.hf_pretrained.state import StateDict

        self.config = config
        self.state = StateDict(state_dict)
        self.model_name_or_path = name


def _models(policy) -> list[torch.nn.Module]:
    from parallel.policy import unwrap

    models = [unwrap(c) for c in policy.chunks]
    for model in models:
        # why: the bridge reads config.share_embeddings_and_output_weights, which megatron's TransformerConfig
        # lacks (GPTModel keeps it on the module); unset, a tied model exports no lm_head.weight.
        model.config.share_embeddings_and_output_weights = bool(
            getattr(model, "share_embeddings_and_output_weights", False)
        )
    return models


def _bridge(policy, hf_cfg):
    family = policy.cfg.model.family
    bridge = import_bridges((family,))[family]()
    bridge.hf_config = hf_cfg
    return bridge


def _pad_vocab(state_dict: dict, padded: int) -> dict:
    """why: the bridge pads embedding rows only at TP > 1 (shape mismatch at TP1); we pad to vocab_pad_multiple."""
    out = dict(state_dict)
    for k in VOCAB_TENSORS:
        if k in out and out[k].shape[0] < padded:
            t = out[k]
            out[k] = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
    return out


def import_hf_state(policy, state_dict: dict[str, torch.Tensor], hf_cfg=None) -> None:
    """HF-named full tensors (checkpoint layout: DeepSeek experts per expert) -> this rank's shards.
    Every rank passes the same tensors. Missing MTP tensors (transformers has no MTP module) stay as they are."""
    hf_cfg = hf_cfg or make_hf_config(policy.cfg.model)
    models = _models(policy)
    state_dict = _pad_vocab(state_dict, policy.cfg.model.padded_vocab_size)
    _bridge(policy, hf_cfg).load_weights_hf_to_megatron(HFState(hf_cfg, state_dict), models)
    if policy.optimizer is not None:  # fp32 main params / distributed-optimizer shards are copies
        policy.optimizer.reload_model_params()


def load_hf_dir(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in hf_dir (fine for the model sizes we convert on CPU)."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {hf_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def import_hf(policy, hf_dir) -> None:
    """Load an HF checkpoint directory (config.json + safetensors) into the policy at its layout."""
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(str(hf_dir))
    ours = make_hf_config(policy.cfg.model)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(hf_cfg, k) != getattr(ours, k):
            raise ValueError(
                f"{hf_dir}: {k}={getattr(hf_cfg, k)} but model {policy.cfg.model.name} has {getattr(ours, k)}"
            )
    import_hf_state(policy, load_hf_dir(hf_dir), ours)


def _export_plan(policy, models) -> tuple:
    """(bridge, hf_cfg, conversion tasks), built once per set of parameter tensors.

    why: at small sizes building the bridge's tasks (a collective over PP, a walk of every module) costs
    as much as exporting the weights, and a weight sync runs after every RL step. The tasks hold the
    parameter and buffer tensors, so the key is each tensor's identity and storage: a tensor replaced or
    re-pointed (`param.data = ...`) rebuilds the plan instead of exporting stale weights."""
    key = tuple((id(t), t.data_ptr()) for model in models for t in (*model.parameters(), *model.buffers()))
    plan = policy.export_plan
    # Building is collective over the ranks that export together. They build, load and step their
    # parameters together, so their keys change together: no vote (a collective here would hang the
    # single-rank export a restarting engine makes, inference.colocated.start_engine).
    if plan is None or plan[0] != key:
        hf_cfg = make_hf_config(policy.cfg.model)
        bridge = _bridge(policy, hf_cfg)
        plan = (key, bridge, hf_cfg, bridge.build_conversion_tasks(hf_cfg, models))
        policy.export_plan = plan
    return plan[1:]


def export_hf(policy, include_mtp: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor) for every mapped weight, on every rank (TP/EP gathered, PP broadcast by the bridge).
    Collective: every rank of the model-parallel group must consume the whole iterator.
    Tied embeddings: lm_head.weight is always included (vLLM otherwise keeps a stale logits head)."""
    m = policy.cfg.model
    models = _models(policy)
    bridge, hf_cfg, tasks = _export_plan(policy, models)
    # why: exporting with a name-filtered source breaks at PP > 1 when a param's HF name is absent (bridge
    # bug: "Object must exist on at least one PP rank"); export by config (all names) and filter here.
    # No LoRA adapters exist here, so the bridge's per-export adapter discovery is skipped.
    stream = bridge.stream_weights_megatron_to_hf(
        models, hf_cfg, cpu=True, show_progress=False, conversion_tasks=tasks, merge_adapter_weights=False
    )
    n_layers = m.num_layers
    seen = set()
    for name, t in stream:
        if not include_mtp and name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers:
            continue
        if name in VOCAB_TENSORS:
            t = t[: m.vocab_size]  # why: the bridge never trims our padded vocab rows
        seen.add(name)
        yield name, t.detach()
    if m.tie_word_embeddings and "lm_head.weight" not in seen and "model.embed_tokens.weight" in seen:
        raise RuntimeError("tied model exported no lm_head.weight")  # the stale-logits-head trap


def save_hf(policy, out_dir, tokenizer=None, include_mtp: bool = True) -> Path | None:
    """config.json + model.safetensors (+ tokenizer files) under out_dir; collective, rank 0 writes.
    Returns out_dir on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    from parallel.parallelize import is_rank0

    rank0 = is_rank0()
    tensors = {}
    for name, t in export_hf(policy, include_mtp=include_mtp):
        if rank0:
            tensors[name] = t.contiguous().clone()
    if not rank0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_hf_config(policy.cfg.model, dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        from core.run_tokenizer import save_tokenizer_files

        save_tokenizer_files(tokenizer, out)
    return out
