"""The model side: presets as megatron configs, the local spec's replacements, forward shapes."""

import dataclasses
import functools

import pytest
import torch

from core.compose import compose
from parallel.policy import build_policy, runtime_config


def _walk(node, seen):
    if isinstance(node, type):
        seen.add(node)
    elif isinstance(node, list):
        for n in node:
            _walk(n, seen)
    elif isinstance(node, functools.partial):
        _walk(node.func, seen)
        for v in [*node.args, *node.keywords.values()]:
            _walk(v, seen)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            _walk(getattr(node, f.name), seen)
    return seen


@pytest.mark.parametrize("name", ["qwen2_5_1_5b", "qwen2_5_7b", "llama3_1_8b", "deepseek_v3_671b"])
def test_full_size_presets_are_valid_megatron_configs(P, name):
    from core.model import transformer_config

    cfg = compose([f"model={name}"])
    config = transformer_config(cfg.model, **runtime_config(cfg))
    assert config.num_layers == cfg.model.num_layers and config.hidden_size == cfg.model.hidden_size
    if cfg.model.is_moe:
        assert config.moe_layer_freq[: cfg.model.first_k_dense_replace] == [0] * cfg.model.first_k_dense_replace


def test_local_spec_has_no_cpu_incompatible_modules(P):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from core.layers import SDPACoreAttention, TorchNorm
    from core.model import DuplicatedLinear, layer_specs, transformer_config

    cfg = compose(["model=tiny_dsv3"])
    block, mtp = layer_specs(transformer_config(cfg.model, **runtime_config(cfg)), use_te=False)
    classes = _walk(mtp, _walk(block, set()))
    assert not {WrappedTorchNorm, DotProductAttention} & classes
    assert {SDPACoreAttention, TorchNorm, DuplicatedLinear} <= classes


def test_sdpa_core_attention_equals_megatron_dot_product_attention(P):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from core.data import causal_mask
    from core.layers import SDPACoreAttention
    from core.model import transformer_config

    cfg = compose([])
    config = transformer_config(cfg.model, **runtime_config(cfg))
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPACoreAttention(**args), DotProductAttention(**args)
    g = torch.Generator().manual_seed(0)
    s, b = 12, 3
    q = torch.randn(s, b, 4, 32, generator=g)
    k, v = torch.randn(s, b, 2, 32, generator=g), torch.randn(s, b, 2, 32, generator=g)  # GQA: 2 groups
    mask = causal_mask(s)
    out = ours(q, k, v, mask)
    assert out.shape == (s, b, 4 * 32)
    torch.testing.assert_close(out, theirs(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_torch_norm_marks_params_for_the_sequence_parallel_reduce():
    from core.layers import TorchNorm

    config = type("C", (), {"normalization": "RMSNorm", "params_dtype": torch.float32, "sequence_parallel": True})
    norm = TorchNorm(config, 16, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True


@pytest.mark.parametrize("name,params", [("tiny_dense", (0.7e6, 0.9e6)), ("tiny_dsv3", (1.5e6, 3e6))])
def test_tiny_models_build_and_run(P, name, params):
    from core.data import causal_mask

    cfg = compose([f"model={name}"])
    policy = build_policy(cfg, with_optimizer=False)
    n = sum(p.numel() for p in policy.chunks[0].parameters())
    assert params[0] < n < params[1]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 10))
    logits = policy.chunks[0](tokens, torch.arange(10).expand(2, 10), causal_mask(10))
    assert logits.shape == (2, 10, cfg.model.padded_vocab_size)
    assert torch.isfinite(logits).all()
