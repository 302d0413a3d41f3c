"""Lets megatron-core 0.19 run on CPU with gloo. Active only when CUDA is absent.

Every patch is one `Patch` record: the megatron module it changes, why, the upstream text it relies
on, and an `install(module)` run right after that module is imported (or at once, if it already is),
so import order never matters. `tests/test_cpu_compat.py` checks each `relies_on` against the
installed megatron-core: an upgrade that changes a patched spot fails loudly instead of silently
running unpatched code. `apply()` is cheap (it imports no megatron); importing the `parallel` package calls it, and every entry
point that builds a model imports `parallel` first (core knows nothing of it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch

_MEGATRON = "megatron.core"
_BRIDGE = "megatron.bridge"  # megatron-bridge's conversion code calls torch.cuda like megatron.core does
_PROXIED = (_MEGATRON, _BRIDGE)


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    module: str  # the megatron module patched; its source must contain `relies_on`
    relies_on: tuple[str, ...]
    install: Callable[[types.ModuleType | None], None]
    now: bool = False  # install at apply() time instead of when `module` is imported


def _to_cpu_device(device):
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _factory(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapped


class _NoStream:
    """CPU ops are synchronous, so every stream/event operation is already complete."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # wait_stream, record_event, synchronize, ...: nothing to wait for; events are streams' twins.
        return lambda *args, **kwargs: self

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as megatron sees it on a CPU machine."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: "cpu"
        self.Stream = self.Event = _NoStream
        self.current_stream = self.default_stream = lambda *a, **k: _NoStream()
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.synchronize = lambda *a, **k: None
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.manual_seed = self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.memory_allocated = self.max_memory_allocated = self.memory_reserved = lambda *a, **k: 0
        self.empty_cache = lambda: None
        self.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """`torch` as megatron's modules see it on CPU: CUDA devices map to CPU, CUDA-only APIs to no-ops."""

    _FACTORIES = (
        "tensor",
        "zeros",
        "ones",
        "empty",
        "full",
        "arange",
        "rand",
        "randn",
        "randint",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "as_tensor",
        "eye",
        "linspace",
    )

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()
_PENDING: dict[str, list[Patch]] = {}  # module name -> patches waiting for its import


def _on_import(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _CPU_TORCH
    for patch in _PENDING.pop(module.__name__, []):
        patch.install(module)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Runs `_on_import` on every megatron.core / megatron.bridge module right after it executes."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_PROXIED):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _on_import(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def _stub_paged_stash(_=None):
    name = f"{_MEGATRON}.transformer.moe.ops.paged_stash"
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def unavailable(*args, **kwargs):
        raise RuntimeError("moe_paged_stash needs triton and a GPU; leave moe_paged_stash off on CPU")

    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = unavailable
    sys.modules[name] = stub


def _patch_rng(random):
    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    class _DropForkWarning(logging.Filter):
        # On CPU the tracked "cuda" generator *is* the CPU generator, so the fork always changes it.
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(random.__name__).addFilter(_DropForkWarning())


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_tensors_pass_as_cuda():
    """Inside: `t.type()` names CPU tensors as CUDA ones and `t.cuda()` leaves them on the CPU."""
    type_, cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_type(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs:
            name = type_(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return type_(self, dtype, *args, **kwargs)

    torch.Tensor.type = cuda_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = type_, cuda


def _pass_cpu_tensors_as_cuda(*targets: str):
    """An install function wrapping each 'Owner.method' or 'function' of the module."""

    def install(module):
        for target in targets:
            owner_name, _, attr = target.rpartition(".")
            owner = getattr(module, owner_name) if owner_name else module
            raw = owner.__dict__[attr]
            kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
            fn = raw.__func__ if kind else raw

            @functools.wraps(fn)
            def wrapped(*args, _fn=fn, **kwargs):
                with _cpu_tensors_pass_as_cuda():
                    return _fn(*args, **kwargs)

            setattr(owner, attr, kind(wrapped) if kind else wrapped)

    return install


def _patch_moe_split_sizes(moe_utils):
    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts to numpy only for CUDA tensors; gloo's all_to_all_single needs
        # split sizes as a sequence, which a CPU tensor is not.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu


def _patch_adam_step_restore(distrib):
    original = distrib.DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        # The loop copies every tensor in the param's Adam state, torch's tensor `step` included,
        # but the loader leaves `step` out (restored separately); None is what the loop skips.
        return original(self, model_param, {"step": None, **tensors})

    distrib.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _patch_mla_linear(mla):
    if mla.Linear is None:
        from megatron.core.post_training.modelopt.layers import Linear

        mla.Linear = Linear


def _m(name: str) -> str:
    return f"{_MEGATRON}.{name}"


PATCHES: tuple[Patch, ...] = (
    Patch(
        "paged_stash_stub",
        "the MoE paged-stash triton kernels are imported unconditionally but used only with moe_paged_stash",
        _m("transformer.moe.ops.paged_stash"),
        ("import triton", "GLOBAL_BLOCK_SIZE = 1024"),
        _stub_paged_stash,
        now=True,
    ),
    Patch(
        "torch_proxy",
        "megatron allocates on torch.cuda.current_device()/device='cuda' and uses CUDA streams, events and "
        "RNG everywhere; each megatron module gets a torch whose CUDA entry points map to CPU",
        _m("parallel_state"),
        ("torch.cuda.current_device()",),
        lambda _: sys.meta_path.insert(0, _MegatronImportHook()),
        now=True,
    ),
    Patch(
        "rng_tracker",
        "the model-parallel RNG tracker reads and writes CUDA generator states directly",
        _m("tensor_parallel.random"),
        ("def _get_cuda_rng_state(", "def _set_cuda_rng_state(", "torch.cuda.default_generators"),
        _patch_rng,
    ),
    Patch(
        "distrib_optimizer_cuda_tensors",
        "the distributed optimizer accepts only params whose type() is 'torch.cuda.*Tensor' and moves "
        "state to CUDA when gathering it for a checkpoint",
        _m("optimizer.distrib_optimizer"),
        ("model_param.type() == 'torch.cuda.FloatTensor'", "send_tensor = send_tensor.cuda()"),
        _pass_cpu_tensors_as_cuda(
            "DistributedOptimizer._build_model_and_main_param_groups",
            "DistributedOptimizer.get_parameter_state_dp_zero",
        ),
    ),
    Patch(
        "float16_optimizer_cuda_tensors",
        "the bf16/fp16 optimizer accepts only 'torch.cuda.*Tensor' params",
        _m("optimizer.optimizer"),
        ("param.type() == 'torch.cuda.FloatTensor'",),
        _pass_cpu_tensors_as_cuda("Float16OptimizerWithFloat16Params.__init__"),
    ),
    Patch(
        "clip_grads_cuda_tensors",
        "grad clipping asserts that grads are 'torch.cuda.FloatTensor'",
        _m("optimizer.clip_grads"),
        ("assert param.grad.type() == 'torch.cuda.FloatTensor'",),
        _pass_cpu_tensors_as_cuda("clip_grad_by_total_norm_fp32"),
    ),
    Patch(
        "tied_embedding_cuda",
        "the tied-embedding sync between pipeline stages moves the weight to CUDA",
        _m("models.common.language_module.language_module"),
        ("weight.data = weight.data.cuda()",),
        _pass_cpu_tensors_as_cuda("LanguageModule.setup_embeddings_and_output_layer"),
    ),
    Patch(
        "checkpoint_exchange_cuda",
        "dist-checkpoint loading moves exchanged shards to CUDA",
        _m("dist_checkpointing.exchange_utils"),
        ("all_loaded_tensors[shard_id].cuda()",),
        _pass_cpu_tensors_as_cuda("exchange_loaded_tensors_gather_rounds", "exchange_loaded_tensors_broadcast"),
    ),
    Patch(
        "adam_step_restore",
        "without apex, torch's Adam keeps `step` as a state tensor, which the distributed optimizer's "
        "fully-reshardable load does not pass in, so it raises KeyError: 'step'",
        _m("optimizer.distrib_optimizer"),
        ('if k == "step":', "dst_tensors[key].copy_(tensors[key])"),
        _patch_adam_step_restore,
    ),
    Patch(
        "moe_split_sizes",
        "the MoE all-to-all dispatcher turns split sizes into numpy only when they were on a GPU; on CPU "
        "they stay tensors and gloo's all_to_all_single rejects them",
        _m("transformer.moe.moe_utils"),
        ("if torch.is_tensor(tensor) and tensor.is_cuda:", "cpu_tensor = cpu_tensor.numpy()"),
        _patch_moe_split_sizes,
    ),
    Patch(
        "mla_duplicated_linear",
        "without Transformer Engine, MLA accepts no duplicated (sequence-sharded) Linear for its "
        "down-projections, and the column-parallel ones lose the TP sum of the rope key's grad",
        _m("transformer.multi_latent_attention"),
        (
            "from megatron.core.post_training.modelopt.layers import Linear",
            "Linear,\n                TEColumnParallelLinear,",
        ),
        _patch_mla_linear,
    ),
    Patch(
        "bridge_torch_proxy",
        "megatron-bridge's replicated-weight mapping broadcasts from torch.cuda.current_device() at TP > 1; "
        "the import hook gives megatron.bridge modules the same CPU torch (nothing else to install)",
        "megatron.bridge.models.conversion.param_mapping",
        ("torch.cuda.current_device()",),
        lambda _: None,
    ),
)

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Arms every patch once; a no-op (returns False) when CUDA is present."""
    global _applied
    if _applied or not needed():
        return _applied
    for patch in PATCHES:
        if patch.now:
            patch.install(None)
        else:
            _PENDING.setdefault(patch.module, []).append(patch)
    for name, module in list(sys.modules.items()):  # megatron modules imported before us
        if name.startswith(_PROXIED) and module is not None:
            _on_import(module)
    _applied = True
    return True
