"""Lets megatron-core 0.19 run on CPU with gloo. Active only when CUDA is absent.

Every patch is one `Patch` record: what it replaces, why, and the upstream text it relies on.
`tests/test_cpu_compat.py` checks each `relies_on` against the installed megatron-core, so an upgrade
that changes a patched spot fails loudly instead of silently running unpatched code.
Call `apply()` before the first `import megatron.core`; `parallel.__init__` does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch

_MEGATRON = "megatron.core"


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    module: str  # megatron module whose source must contain `relies_on`
    relies_on: tuple[str, ...]
    install: Callable[[], None]


def _to_cpu_device(device):
    if device is None:
        return None
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
        "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
        "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "eye", "linspace",
    )  # fmt: skip

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH: _CpuTorch | None = None


def _swap_torch(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _CPU_TORCH


class _ProxyTorchFinder(importlib.abc.MetaPathFinder):
    """Gives every megatron.core module imported from now on the CPU `torch`."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_MEGATRON):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_swap(module):
            exec_module(module)
            _swap_torch(module)

        spec.loader.exec_module = exec_and_swap
        return spec


def _install_torch_proxy():
    global _CPU_TORCH
    _CPU_TORCH = _CpuTorch()
    sys.meta_path.insert(0, _ProxyTorchFinder())
    for name, module in list(sys.modules.items()):
        if name.startswith(_MEGATRON) and module is not None:
            _swap_torch(module)


def _install_paged_stash_stub():
    name = f"{_MEGATRON}.transformer.moe.ops.paged_stash"
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def unavailable(*args, **kwargs):
        raise RuntimeError("moe_paged_stash needs triton and a GPU; leave moe_paged_stash off on CPU")

    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = unavailable
    sys.modules[name] = stub


def _install_rng():
    random = importlib.import_module(f"{_MEGATRON}.tensor_parallel.random")
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


# megatron functions that call CUDA-only tensor methods: (module, owner or None, function).
_CUDA_TENSOR_METHOD_USERS = (
    ("optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"),
    ("optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("optimizer.distrib_optimizer", "DistributedOptimizer", "get_parameter_state_dp_zero"),
    ("optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("models.common.language_module.language_module", "LanguageModule", "setup_embeddings_and_output_layer"),
    ("dist_checkpointing.exchange_utils", None, "exchange_loaded_tensors_gather_rounds"),
    ("dist_checkpointing.exchange_utils", None, "exchange_loaded_tensors_broadcast"),
)


def _wrap(owner, attr):
    raw = owner.__dict__[attr]
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else raw

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cpu_tensors_pass_as_cuda():
            return fn(*args, **kwargs)

    setattr(owner, attr, kind(wrapped) if kind else wrapped)
    return wrapped


def _rebind(attr: str, original, replacement) -> None:
    """Modules that did `from x import f` still hold the original f; point them at the replacement."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(_MEGATRON) and getattr(module, attr, None) is original:
            setattr(module, attr, replacement)


def _install_tensor_methods():
    for mod_name, owner_name, attr in _CUDA_TENSOR_METHOD_USERS:
        module = importlib.import_module(f"{_MEGATRON}.{mod_name}")
        owner = getattr(module, owner_name) if owner_name else module
        original = owner.__dict__[attr]
        wrapped = _wrap(owner, attr)
        if owner_name is None:
            _rebind(attr, original, wrapped)


def _install_moe_split_sizes():
    moe_utils = importlib.import_module(f"{_MEGATRON}.transformer.moe.moe_utils")
    importlib.import_module(f"{_MEGATRON}.transformer.moe.token_dispatcher")
    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts to numpy only for CUDA tensors; gloo's all_to_all_single needs
        # split sizes as a sequence, which a CPU tensor is not.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    _rebind("maybe_move_tensor_to_cpu", original, move_to_cpu)


def _install_adam_step_restore():
    distrib = importlib.import_module(f"{_MEGATRON}.optimizer.distrib_optimizer")
    original = distrib.DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        # The loop copies every tensor in the param's Adam state, torch's tensor `step` included,
        # but the loader leaves `step` out (restored separately); None is what the loop skips.
        return original(self, model_param, {"step": None, **tensors})

    distrib.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _install_mla_linear():
    mla = importlib.import_module(f"{_MEGATRON}.transformer.multi_latent_attention")
    if mla.Linear is None:
        mla.Linear = importlib.import_module(f"{_MEGATRON}.post_training.modelopt.layers").Linear


PATCHES: tuple[Patch, ...] = (
    Patch(
        "paged_stash_stub",
        "the MoE paged-stash triton kernels are imported unconditionally but used only with moe_paged_stash",
        f"{_MEGATRON}.transformer.moe.ops.paged_stash",
        ("import triton", "GLOBAL_BLOCK_SIZE = 1024"),
        _install_paged_stash_stub,
    ),
    Patch(
        "torch_proxy",
        "megatron allocates on torch.cuda.current_device()/device='cuda' and uses CUDA streams, "
        "events and RNG everywhere; its modules get a torch whose CUDA entry points map to CPU",
        f"{_MEGATRON}.parallel_state",
        ("torch.cuda.current_device()",),
        _install_torch_proxy,
    ),
    Patch(
        "rng_tracker",
        "the model-parallel RNG tracker reads and writes CUDA generator states directly",
        f"{_MEGATRON}.tensor_parallel.random",
        ("def _get_cuda_rng_state(", "def _set_cuda_rng_state(", "torch.cuda.default_generators"),
        _install_rng,
    ),
    Patch(
        "tensor_methods",
        "optimizers and grad clipping accept only tensors whose type() is 'torch.cuda.*Tensor', and the "
        "tied-embedding setup and checkpoint exchange call .cuda(); inside those functions CPU tensors pass",
        f"{_MEGATRON}.optimizer.distrib_optimizer",
        ("model_param.type() == 'torch.cuda.FloatTensor'", "def _build_model_and_main_param_groups("),
        _install_tensor_methods,
    ),
    Patch(
        "adam_step_restore",
        "without apex, torch's Adam keeps `step` as a state tensor, which the distributed optimizer's "
        "fully-reshardable load does not pass in, so it raises KeyError: 'step'",
        f"{_MEGATRON}.optimizer.distrib_optimizer",
        ('if k == "step":', "dst_tensors[key].copy_(tensors[key])"),
        _install_adam_step_restore,
    ),
    Patch(
        "moe_split_sizes",
        "the MoE all-to-all dispatcher turns split sizes into numpy only when they were on a GPU; on CPU "
        "they stay tensors and gloo's all_to_all_single rejects them",
        f"{_MEGATRON}.transformer.moe.moe_utils",
        ("if torch.is_tensor(tensor) and tensor.is_cuda:", "cpu_tensor = cpu_tensor.numpy()"),
        _install_moe_split_sizes,
    ),
    Patch(
        "mla_duplicated_linear",
        "without Transformer Engine, MLA accepts no duplicated (sequence-sharded) Linear for its "
        "down-projections, and the column-parallel ones lose the TP sum of the rope key's grad",
        f"{_MEGATRON}.transformer.multi_latent_attention",
        ("from megatron.core.post_training.modelopt.layers import Linear", "Linear,\n                TEColumnParallelLinear,"),
        _install_mla_linear,
    ),
)

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Installs every patch once; a no-op (returns False) when CUDA is present."""
    global _applied
    if _applied or not needed():
        return _applied
    for patch in PATCHES:
        patch.install()
    _applied = True
    return True
