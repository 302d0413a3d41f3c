"""Parameter, FLOP and activation counts of a `ModelConfig`, per layer kind, and what each pipeline stage holds.

Counts are per token and before any tensor/expert split; the memory and time models divide them by the
layout. Only matmul FLOPs are counted (2 per multiply-add); norms, rope, softmax and routing are noise at
these sizes. Attention core FLOPs use the mean attended length (causal: (s + 1) / 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Config, ModelConfig
from core.validate import pipeline_layers


@dataclass(frozen=True)
class Arch:
    h: int
    layers: int
    dense_layers: int  # leading dense-MLP layers (DeepSeek-V3: 3); all of them for a dense model
    heads: int
    qk_dim: int  # per-head query/key width (MLA: nope + rope)
    v_dim: int
    vocab: int  # padded
    attn: int  # attention params per layer (projections + norms)
    dense_mlp: int  # dense MLP params per layer
    expert: int  # one routed expert's params
    experts: int  # routed experts per MoE layer (0 = dense model)
    topk: int
    shared: int  # shared-expert params per MoE layer
    router: int
    embed: int
    head: int  # 0 when tied
    mtp: int  # MTP modules (each: a projection, norms, one MoE layer); 0 = none
    mtp_proj: int  # per MTP module, besides its layer
    kv_cache_bytes: int  # engine KV cache per token per layer, bf16 (MLA: the latent, on every TP rank)
    kv_shards_with_tp: bool  # GQA caches split over TP ranks, MLA's latent does not
    mla: dict | None  # the MLA widths activations need

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    def layer_params(self, kind: str) -> tuple[int, int]:
        """(non-expert params, routed-expert params) of one 'dense' or 'moe' layer."""
        if kind == "dense":
            return self.attn + self.dense_mlp + 2 * self.h, 0
        return self.attn + self.shared + self.router + 2 * self.h, self.experts * self.expert

    @property
    def mtp_kind(self) -> str:
        return "moe" if self.experts else "dense"

    def engine_params(self) -> int:
        """What an inference engine loads: everything but the MTP modules."""
        dense = self.dense_layers * sum(self.layer_params("dense"))
        moe = self.moe_layers * sum(self.layer_params("moe"))
        return dense + moe + self.embed + self.head + self.h

    def total_params(self) -> int:
        return self.engine_params() + self.mtp * (sum(self.layer_params(self.mtp_kind)) + self.mtp_proj)

    def non_expert_params(self) -> int:
        """Weights every decode step reads whatever the routing: attention, dense MLPs, shared experts, routers,
        embedding and head."""
        return self.engine_params() - self.moe_layers * self.experts * self.expert

    def active_params(self) -> int:
        """Params a token passes through (embedding row lookups excluded, the output head included)."""
        moe = self.attn + self.shared + self.router + self.topk * self.expert
        return self.dense_layers * (self.attn + self.dense_mlp) + self.moe_layers * moe + self.head_or_embed

    @property
    def head_or_embed(self) -> int:
        return self.head or self.embed

    def linear_flops(self, kind: str) -> int:
        """Forward matmul FLOPs per token of one layer ('dense', 'moe'), without the attention core."""
        mlp = self.dense_mlp if kind == "dense" else self.shared + self.router + self.topk * self.expert
        return 2 * (self.attn + mlp)

    def attn_core_flops(self, ctx: float) -> float:
        """Forward FLOPs per token of the attention core (QK^T and AV) over `ctx` attended positions."""
        return 2 * self.heads * (self.qk_dim + self.v_dim) * ctx

    def mtp_linear_flops(self) -> int:
        return self.mtp * (self.linear_flops(self.mtp_kind) + 2 * self.mtp_proj + 2 * self.head_or_embed)

    def token_flops(self, ctx: float, with_mtp: bool = True) -> float:
        """Forward FLOPs per token of the whole model (all layers, the head, MTP when trained)."""
        f = self.dense_layers * self.linear_flops("dense") + self.moe_layers * self.linear_flops("moe")
        f += 2 * self.head_or_embed + self.layers * self.attn_core_flops(ctx)
        if with_mtp and self.mtp:
            f += self.mtp_linear_flops() + self.mtp * self.attn_core_flops(ctx)
        return f


def arch(m: ModelConfig) -> Arch:
    h = m.hidden_size
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        heads = m.num_attention_heads
        q = (h + 1 + heads * qk) * m.q_lora_rank if m.q_lora_rank else h * heads * qk
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank
        kv += m.kv_lora_rank * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim)
        attn = q + kv + m.num_attention_heads * m.v_head_dim * h
        qk_dim, v_dim = qk, m.v_head_dim
        kv_cache = (m.kv_lora_rank + m.qk_pos_emb_head_dim) * 2
        mla = dict(q_lora=m.q_lora_rank or 0, kv_latent=m.kv_lora_rank + m.qk_pos_emb_head_dim)
    else:
        d = m.kv_channels or h // m.num_attention_heads
        groups = m.num_query_groups or m.num_attention_heads
        attn = h * d * (m.num_attention_heads + 2 * groups) + m.num_attention_heads * d * h
        attn += d * (m.num_attention_heads + 2 * groups) if m.add_qkv_bias else 0
        qk_dim = v_dim = d
        kv_cache = 2 * groups * d * 2
        mla = None
    moe = m.is_moe
    expert = 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size) if moe else 0
    vocab = m.padded_vocab_size
    return Arch(
        h=h,
        layers=m.num_layers,
        dense_layers=m.first_k_dense_replace if moe else m.num_layers,
        heads=m.num_attention_heads,
        qk_dim=qk_dim,
        v_dim=v_dim,
        vocab=vocab,
        attn=attn,
        dense_mlp=3 * h * m.ffn_hidden_size,
        expert=expert,
        experts=m.num_moe_experts or 0,
        topk=m.moe_router_topk if moe else 0,
        shared=3 * h * (m.moe_shared_expert_intermediate_size or 0) if moe else 0,
        router=h * m.num_moe_experts if moe else 0,
        embed=vocab * h,
        head=0 if m.tie_word_embeddings else vocab * h,
        mtp=m.mtp_num_layers or 0,
        mtp_proj=2 * h * h + 2 * h,
        kv_cache_bytes=kv_cache,
        kv_shards_with_tp=not m.multi_latent_attention,
        mla=mla,
    )


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its decoder layers by kind, and whether it holds the embedding, head and MTP."""

    index: int
    kinds: tuple[str, ...]
    embed: bool
    head: bool  # the output head, the loss, and the MTP modules (megatron puts MTP on the last stage)


def stages(cfg: Config) -> list[Stage]:
    m, p = cfg.model, cfg.parallel
    counts = pipeline_layers(m.num_layers, p)
    dense = m.first_k_dense_replace if m.is_moe else m.num_layers
    out, start = [], 0
    for i, n in enumerate(counts):
        kinds = tuple("dense" if j < dense else "moe" for j in range(start, start + n))
        out.append(Stage(i, kinds, embed=i == 0, head=i == len(counts) - 1))
        start += n
    return out
