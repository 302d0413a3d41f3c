"""Our ModelConfig -> the transformers config of the same architecture (what vLLM and the HF bridge read).

Vocab is `model.vocab_size` (unpadded): the padded rows exist only inside megatron and are trimmed on export.
"""

from __future__ import annotations

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def _rope(m) -> dict:
    if m.llama3_rope_scaling:
        return {
            "rope_type": "llama3",
            "rope_theta": float(m.rotary_base),
            "factor": float(m.llama3_rope_scaling),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # megatron-core's Llama 3 scaling fixes it at 8192 (RotaryEmbedding._apply_scaling), whatever
            # model.original_max_position_embeddings (a yarn field) says.
            "original_max_position_embeddings": 8192,
        }
    if m.rope_type == "yarn":
        return {
            "rope_type": "yarn",
            "rope_theta": float(m.rotary_base),
            "factor": float(m.rotary_scaling_factor),
            "original_max_position_embeddings": m.original_max_position_embeddings,
            "mscale": float(m.mscale),
            "mscale_all_dim": float(m.mscale_all_dim),
        }
    return {"rope_type": "default", "rope_theta": float(m.rotary_base)}


def hf_config(m, dtype: str = "float32"):
    """A transformers PretrainedConfig for ModelConfig `m` (families qwen2, qwen3, llama, deepseek_v3)."""
    import transformers

    rope = _rope(m)
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters=rope,
        tie_word_embeddings=bool(m.tie_word_embeddings),
        attention_dropout=0.0,
    )
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    kv_heads = m.num_query_groups or m.num_attention_heads
    if m.qk_layernorm and m.family != "qwen3":
        raise ValueError(f"family {m.family} has no q/k norms: set model.qk_layernorm=false (or use family qwen3)")
    if m.family == "qwen2":
        if not m.add_qkv_bias:
            raise ValueError("family qwen2 has QKV biases: set model.add_qkv_bias=true (or use family llama)")
        cfg = transformers.Qwen2Config(num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    elif m.family == "qwen3":
        if m.add_qkv_bias or not m.qk_layernorm:
            raise ValueError(
                "family qwen3 has q/k norms and no QKV bias: set model.qk_layernorm=true, add_qkv_bias=false"
            )
        cfg = transformers.Qwen3Config(num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    elif m.family == "llama":
        cfg = transformers.LlamaConfig(
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            attention_bias=bool(m.add_qkv_bias),
            mlp_bias=False,
            **common,
        )
    elif m.family == "deepseek_v3":
        if not (m.multi_latent_attention and m.num_moe_experts):
            raise ValueError("family deepseek_v3 needs multi_latent_attention and num_moe_experts")
        if m.moe_router_score_function != "sigmoid":
            raise ValueError("DeepSeek-V3 routing is sigmoid (model.moe_router_score_function)")
        shared = (m.moe_shared_expert_intermediate_size or 0) // m.moe_ffn_hidden_size
        cfg = transformers.DeepseekV3Config(
            num_key_value_heads=m.num_attention_heads,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            n_shared_experts=shared,
            n_routed_experts=m.num_moe_experts,
            routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0,
            kv_lora_rank=m.kv_lora_rank,
            q_lora_rank=m.q_lora_rank,
            qk_rope_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            qk_nope_head_dim=m.qk_head_dim,
            n_group=m.moe_router_num_groups or 1,
            topk_group=m.moe_router_group_topk or 1,
            num_experts_per_tok=m.moe_router_topk,
            first_k_dense_replace=m.first_k_dense_replace,
            norm_topk_prob=True,
            rope_interleave=True,
            num_nextn_predict_layers=m.mtp_num_layers or 0,
            **common,
        )
        # vLLM's DeepseekV3 reads these (old remote-code fields transformers 5 no longer writes).
        cfg.scoring_func, cfg.topk_method = "sigmoid", "noaux_tc"
    else:
        raise ValueError(f"no HF config for model family {m.family!r}")
    cfg.architectures = [ARCHITECTURES[m.family]]
    cfg.torch_dtype = dtype
    return cfg
