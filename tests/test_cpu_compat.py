"""One test per CPU compatibility patch: the upstream code it relies on is still there (so a
megatron-core upgrade that moves it fails here, loudly), and the patch does what it says."""

import importlib
import importlib.machinery
from pathlib import Path

import numpy as np
import pytest
import torch

import parallel  # noqa: F401
from parallel import cpu_compat

pytestmark = pytest.mark.skipif(not cpu_compat.needed(), reason="the layer is off where CUDA is present")


def _upstream_source(module: str) -> str:
    # The file on disk: the stubbed module's sys.modules entry is not upstream's code.
    # Located without importing: megatron.bridge's package __init__ needs Transformer Engine.
    root = Path(importlib.machinery.PathFinder.find_spec("megatron").submodule_search_locations[0])
    path = root.joinpath(*module.split(".")[1:])
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()


@pytest.mark.parametrize("patch", cpu_compat.PATCHES, ids=lambda p: p.name)
def test_upstream_still_has_what_the_patch_relies_on(patch):
    source = _upstream_source(patch.module)
    missing = [text for text in patch.relies_on if text not in source]
    assert not missing, (
        f"megatron-core changed under patch '{patch.name}' ({patch.why}): {patch.module} no longer "
        f"contains {missing}. Re-check the patch against the new code."
    )


def test_megatron_core_is_the_pinned_version():
    from importlib.metadata import version

    assert version("megatron-core") == "0.19.2", "the patches were written against megatron-core 0.19.2"


def test_apply_is_idempotent_and_reports_active():
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True


def test_paged_stash_stub_raises_a_clear_error():
    stub = importlib.import_module("megatron.core.transformer.moe.ops.paged_stash")
    assert stub.GLOBAL_BLOCK_SIZE == 1024
    with pytest.raises(RuntimeError, match="moe_paged_stash"):
        stub.paged_stash_copy_kernel()


def test_torch_proxy_is_scoped_to_megatron():
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    lazily_imported = importlib.import_module("megatron.core.energy_monitor")  # not loaded by our code
    for module in (layers, lazily_imported):
        assert module.torch is not torch
        assert module.torch.zeros(2, device="cuda").device.type == "cpu"
        assert module.torch.cuda.current_device() == "cpu"
        assert module.torch.Tensor is torch.Tensor
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")  # everyone else still sees the real torch


def test_no_stream_is_complete_at_once():
    cuda = importlib.import_module("megatron.core.tensor_parallel.layers").torch.cuda
    stream = cuda.Stream()
    event = stream.record_event()
    event.synchronize()
    assert event.query() and cuda.current_stream() is not None
    with cuda.stream(stream):
        pass


def test_rng_tracker_forks_the_cpu_generator(single_process):
    from megatron.core.tensor_parallel import random

    torch.manual_seed(0)
    expected_outside = torch.rand(3)
    torch.manual_seed(0)
    tracker = random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-rng", 99)
    with tracker.fork("test-rng"):
        inside = torch.rand(3)
    outside = torch.rand(3)
    assert torch.equal(outside, expected_outside), "the fork must restore the default stream"
    assert not torch.equal(inside, expected_outside)
    torch.manual_seed(99)
    assert torch.equal(inside, torch.rand(3)), "the forked stream is seeded with the tracked seed"


def test_tensor_methods_pass_only_inside_patched_functions():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-6)
    assert torch.ones(1).type() == "torch.FloatTensor"  # outside: untouched
    with cpu_compat._cpu_tensors_pass_as_cuda():
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        t = torch.ones(1)
        assert t.cuda() is t
    assert torch.Tensor.cuda is not None and torch.ones(1).type() == "torch.FloatTensor"


def test_adam_step_restore_wraps_the_loader():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert DistributedOptimizer._set_main_param_and_optimizer_states.__name__ == "_set_main_param_and_optimizer_states"
    assert "step" in DistributedOptimizer._set_main_param_and_optimizer_states.__code__.co_consts


def test_moe_split_sizes_become_numpy_everywhere():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [1, 2]
    assert moe_utils.maybe_move_tensor_to_cpu is token_dispatcher.maybe_move_tensor_to_cpu
    t = torch.tensor([3])
    assert moe_utils.maybe_move_tensor_to_cpu(t) is t


def test_mla_accepts_the_duplicated_linear():
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention

    assert multi_latent_attention.Linear is Linear
