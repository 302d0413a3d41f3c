"""The policy architecture as megatron-core modules.

This module maps a `ModelConfig` to megatron's TransformerConfig fields and layer specs and builds one
GPTModel chunk. It knows nothing of parallelism: parallel sizes, pipeline stage flags and dtypes arrive
as opaque arguments from `parallel.parallelize`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.post_training.modelopt.layers import Linear as DuplicatedLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from core.config import ModelConfig
from core.layers import SDPACoreAttention, TorchNorm


def architecture(m: ModelConfig) -> dict[str, Any]:
    """megatron TransformerConfig fields that describe the network itself."""
    arch: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,  # also avoids an upstream in-place-on-view bug in MoE with biases
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The only dispatcher megatron allows with variable sequence lengths (RL micro-batches trimmed to
        # their longest row under pipeline parallelism); its validation asks it of dense models too.
        moe_token_dispatcher_type="alltoall",
    )
    if m.multi_latent_attention:
        arch.update(
            multi_latent_attention=True,
            qk_layernorm=True,  # DeepSeek's q_a_layernorm / kv_a_layernorm on the compressed latents
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_head_dim=m.qk_head_dim,
            qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            rope_type=m.rope_type,
            rotary_base=m.rotary_base,
            rotary_scaling_factor=m.rotary_scaling_factor,
            original_max_position_embeddings=m.original_max_position_embeddings,
            mscale=m.mscale,
            mscale_all_dim=m.mscale_all_dim,
        )
    if m.is_moe:
        arch.update(
            num_moe_experts=m.num_moe_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_router_topk=m.moe_router_topk,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_num_groups=m.moe_router_num_groups,
            moe_router_group_topk=m.moe_router_group_topk,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=m.moe_router_bias_update_rate,
            moe_router_pre_softmax=m.moe_router_score_function == "softmax",
            moe_router_load_balancing_type="seq_aux_loss" if m.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_dtype="fp32",
            moe_layer_freq=[0] * m.first_k_dense_replace + [1] * (m.num_layers - m.first_k_dense_replace),
        )
    if m.mtp_num_layers:
        arch.update(mtp_num_layers=m.mtp_num_layers, mtp_loss_scaling_factor=m.mtp_loss_scaling_factor)
    return arch


def transformer_config(m: ModelConfig, **runtime: Any) -> TransformerConfig:
    """The full megatron config: architecture plus `runtime` (parallel sizes, dtypes, fusions)."""
    cls = MLATransformerConfig if m.multi_latent_attention else TransformerConfig
    return cls(**architecture(m), **runtime)


def _swap_classes(node: Any, swaps: dict) -> Any:
    """Returns `node` (a layer spec tree) with classes replaced: `swaps` maps a class, or a
    (submodules dataclass, field name) pair, to its replacement."""
    if isinstance(node, type):
        return swaps.get(node, node)
    if isinstance(node, list):
        return [_swap_classes(n, swaps) for n in node]
    if isinstance(node, functools.partial):
        args = [_swap_classes(a, swaps) for a in node.args]
        kwargs = {k: _swap_classes(v, swaps) for k, v in node.keywords.items()}
        return functools.partial(_swap_classes(node.func, swaps), *args, **kwargs)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {
            f.name: swaps.get((type(node), f.name)) or _swap_classes(getattr(node, f.name), swaps)
            for f in dataclasses.fields(node)
        }
        return dataclasses.replace(node, **changes)
    return node


_LOCAL_SWAPS = {
    WrappedTorchNorm: TorchNorm,
    DotProductAttention: SDPACoreAttention,
    # The local spec's column-parallel MLA down-projections drop the TP sum of the shared rope key's
    # grad (its last-dim gather splits the grad in backward). A duplicated Linear on sequence shards
    # is what the TE spec does: the SP gather's reduce-scatter then sums it.
    (MLASelfAttentionSubmodules, "linear_q_down_proj"): DuplicatedLinear,
    (MLASelfAttentionSubmodules, "linear_kv_down_proj"): DuplicatedLinear,
}


def layer_specs(config: TransformerConfig, use_te: bool, vp_stage=None, pp_rank=None):
    """(decoder block spec, MTP block spec or None) for the layers this pipeline stage builds."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
    )
    mtp = None
    if config.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_te, vp_stage=vp_stage, pp_rank=pp_rank)
    if not use_te:
        block, mtp = _swap_classes(block, _LOCAL_SWAPS), _swap_classes(mtp, _LOCAL_SWAPS)
    return block, mtp


def build_gpt(
    m: ModelConfig,
    config: TransformerConfig,
    use_te: bool,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage=None,
    pp_rank=None,
) -> GPTModel:
    block, mtp = layer_specs(config, use_te, vp_stage=vp_stage, pp_rank=pp_rank)
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=m.padded_vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rotary_base),
        rope_scaling=m.llama3_rope_scaling is not None,
        rope_scaling_factor=m.llama3_rope_scaling or 8.0,
        mtp_block_spec=mtp,
        vp_stage=vp_stage,
    )


@contextlib.contextmanager
def without_mtp(model: GPTModel):
    """The model's forward without its multi-token-prediction layers, for the RL losses.

    GPTModel runs its MTP block in every training or scoring forward, and when no labels are passed
    (an RL forward) adds a next-next-token cross-entropy on the rolled inputs, prompts and padding
    included, to the backward. That is a pretraining objective: in a GRPO step it would pollute the
    policy gradient, and it costs an extra layer and a full-vocabulary logit tensor. The MTP weights
    are kept (checkpoints, exports) and are not trained by RL (build_policy(train_mtp=False))."""
    if not model.config.mtp_num_layers:
        yield
        return
    # Both are read at call time: mtp_process runs the block, config.mtp_num_layers its loss.
    saved = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        model.mtp_process, model.config.mtp_num_layers = saved


class ScalarHead(torch.nn.Module):
    """A reward model's output layer: one score per position instead of vocabulary logits. GPTModel calls
    its output layer as `layer(hidden, weight=..., runtime_gather_output=...)` → (output, bias)."""

    def __init__(self, hidden_size: int, init_std: float):
        super().__init__()
        # Named `weight` as the LM head's is: megatron's checkpoint code looks for output_layer.weight.
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size))
        torch.nn.init.normal_(self.weight, std=init_std)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return F.linear(hidden_states, self.weight), None


def build_reward_model(
    m: ModelConfig,
    config: TransformerConfig,
    use_te: bool,
    pre_process: bool = True,
    post_process: bool = True,
    pp_rank=None,
) -> GPTModel:
    """The policy's architecture with a ScalarHead: model(tokens, ...) → [batch, seq, 1] scores."""
    model = build_gpt(
        dataclasses.replace(m, tie_word_embeddings=False),
        config,
        use_te,
        pre_process=pre_process,
        post_process=post_process,
        pp_rank=pp_rank,
    )
    if post_process:
        model.output_layer = ScalarHead(config.hidden_size, config.init_method_std)
    return model
