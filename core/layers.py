"""Local (non-Transformer-Engine) modules that megatron's local layer spec lacks or gets wrong on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention.

    Megatron's local DotProductAttention cannot take MLA's separate key/value head sizes
    (k_channels/v_channels); SDPA handles both, and GQA, and is faster on CPU.
    Shapes follow megatron: q/k/v [s, b, heads, dim] in, [s, b, heads * v_dim] out.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        k_dim = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else k_dim**-0.5

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention takes neither packed_seq_params nor attention_bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        # megatron masks are True where attention is NOT allowed; SDPA's are True where it is.
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=attention_mask is None,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class TorchNorm:
    """torch LayerNorm/RMSNorm for the local spec, also under sequence parallelism.

    megatron's WrappedTorchNorm refuses sequence parallelism. A norm over the hidden dim is correct on
    sequence shards as it is; its grads only need the TP all-reduce that megatron applies to params
    marked `sequence_parallel`.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
