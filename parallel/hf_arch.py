"""An HF model directory's architecture as ModelConfig fields, read through megatron-bridge's own HF →
Megatron mapping (the family bridge's `provider_bridge`, what `AutoBridge.to_megatron_provider` runs), then
the provider's fields copied onto ours. Only what our layer specs build is accepted: anything else is
refused at start-up with the field, its value and what is supported, never approximated.

    model_fields("path/to/Qwen2.5-1.5B")  -> {"family": "qwen2", "num_layers": 28, ...}
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import torch.nn.functional as F

from core.errors import ConfigError
from parallel.hf_bridge import import_bridges

SUPPORTED = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
# megatron-core's Llama 3 rope scaling fixes these (RotaryEmbedding._apply_scaling); only the factor is a knob.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Fields a user may set beside model.path: training knobs, not the architecture the weights were made for.
TRAINING_FIELDS = {
    "name",
    "path",
    "vocab_pad_multiple",
    "init_method_std",
    "moe_aux_loss_coeff",
    "moe_router_bias_update_rate",
    "mtp_loss_scaling_factor",
}


def read_hf_config(path: str | Path):
    """(transformers config, family); ConfigError for a directory that is not a supported HF model."""
    import transformers

    where = Path(path)
    if not (where / "config.json").is_file():
        raise ConfigError(
            f"model.path={path}: no config.json there. Fix: point model.path at a Hugging Face model directory "
            "(config.json, *.safetensors and the tokenizer files)."
        )
    archs = json.loads((where / "config.json").read_text()).get("architectures") or []
    family = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if family is None:
        raise ConfigError(
            f"model.path={path}: config.json has architectures={archs}, which r1stack cannot build. "
            f"Fix: use a model of one of {sorted(SUPPORTED)}."
        )
    return transformers.AutoConfig.from_pretrained(str(where)), family


def _rope(hf_cfg) -> dict:
    """The rope parameters whichever way transformers holds them (5.x: rope_parameters; 4.x: rope_scaling)."""
    return dict(getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {})


def _refuse(path, field, value, fix) -> None:
    raise ConfigError(f"model.path={path}: {field}={value!r} is not supported. Fix: {fix}")


@functools.lru_cache(maxsize=8)
def _fields(path: str, mtime: float) -> tuple:
    hf_cfg, family = read_hf_config(path)
    bridge = import_bridges((family,))[family]()
    p = bridge.provider_bridge(SimpleNamespace(config=hf_cfg))
    if p.activation_func is not F.silu or not p.gated_linear_unit:
        _refuse(path, "hidden_act", getattr(hf_cfg, "hidden_act", None), "only SwiGLU MLPs (hidden_act=silu).")
    if p.normalization != "RMSNorm":
        _refuse(path, "normalization", p.normalization, "only RMSNorm models.")
    if getattr(hf_cfg, "mlp_bias", False) or (family == "llama" and getattr(hf_cfg, "attention_bias", False)):
        # HF Llama's attention_bias also puts a bias on o_proj, which megatron's add_qkv_bias does not build.
        _refuse(path, "mlp_bias/attention_bias", True, "only Llama models without linear biases.")
    rope = _rope(hf_cfg)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    fields: dict = dict(
        family=family,
        num_layers=p.num_layers,
        hidden_size=p.hidden_size,
        ffn_hidden_size=p.ffn_hidden_size,
        num_attention_heads=p.num_attention_heads,
        num_query_groups=p.num_query_groups,
        kv_channels=p.kv_channels,
        vocab_size=p.vocab_size,
        max_position_embeddings=p.seq_length,
        rotary_base=float(p.rotary_base),
        norm_epsilon=p.layernorm_epsilon,
        add_qkv_bias=bool(p.add_qkv_bias),
        qk_layernorm=bool(p.qk_layernorm) and not p.multi_latent_attention,
        tie_word_embeddings=bool(p.share_embeddings_and_output_weights),
        llama3_rope_scaling=None,
    )
    if rope_type == "llama3":
        # why: the bridge reads `rope_scaling`, which a transformers 5 config built in code lacks; check it saw it.
        if not getattr(p, "rope_scaling", False):
            _refuse(path, "rope_parameters", rope, "a config.json megatron-bridge reads (rope_scaling present).")
        for k, want in LLAMA3_ROPE_FIXED.items():
            if float(rope.get(k, want)) != want:
                _refuse(path, f"rope_parameters.{k}", rope.get(k), f"Llama 3 rope with {k}={want} (megatron-core's).")
        fields["llama3_rope_scaling"] = float(p.rope_scaling_factor)
    elif rope_type not in ("default", "yarn") or (rope_type == "yarn" and family != "deepseek_v3"):
        _refuse(path, "rope_parameters.rope_type", rope_type, "default rope, Llama 3 rope, or DeepSeek's yarn.")
    if family == "deepseek_v3":
        fields.update(_deepseek(p, hf_cfg, rope_type, path))
    elif getattr(p, "num_moe_experts", None):
        _refuse(path, "num_experts", p.num_moe_experts, "dense Qwen/Llama models, or DeepSeek-V3 for MoE.")
    return tuple(sorted(fields.items()))


def _deepseek(p, hf_cfg, rope_type: str, path) -> dict:
    if (
        getattr(hf_cfg, "topk_method", "noaux_tc") != "noaux_tc"
        or getattr(hf_cfg, "scoring_func", "sigmoid") != "sigmoid"
    ):
        found = (getattr(hf_cfg, "topk_method", None), getattr(hf_cfg, "scoring_func", None))
        _refuse(path, "topk_method/scoring_func", found, "noaux_tc with sigmoid.")
    freq = list(p.moe_layer_freq)
    return dict(
        multi_latent_attention=True,
        q_lora_rank=p.q_lora_rank,
        kv_lora_rank=p.kv_lora_rank,
        qk_head_dim=p.qk_head_dim,
        qk_pos_emb_head_dim=p.qk_pos_emb_head_dim,
        v_head_dim=p.v_head_dim,
        rope_type="yarn" if rope_type == "yarn" else "rope",
        rotary_scaling_factor=float(p.rotary_scaling_factor),
        original_max_position_embeddings=int(getattr(p, "original_max_position_embeddings", 4096)),
        mscale=float(p.mscale),
        mscale_all_dim=float(p.mscale_all_dim),
        num_moe_experts=p.num_moe_experts,
        moe_ffn_hidden_size=p.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=p.moe_shared_expert_intermediate_size or None,
        moe_router_topk=p.moe_router_topk,
        moe_router_score_function=p.moe_router_score_function,
        moe_router_num_groups=p.moe_router_num_groups,
        moe_router_group_topk=p.moe_router_group_topk,
        moe_router_topk_scaling_factor=p.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=bool(p.moe_router_enable_expert_bias),
        first_k_dense_replace=freq.index(1) if 1 in freq else len(freq),
        mtp_num_layers=p.mtp_num_layers or None,
    )


def model_fields(path: str | Path) -> dict:
    """ModelConfig fields of the HF model at `path` (cached per directory and config.json mtime)."""
    config = Path(path) / "config.json"
    return dict(_fields(str(path), config.stat().st_mtime if config.exists() else 0.0))


def merge_model(path: str, given: dict) -> dict:
    """The `model` group for model.path=`path`: the directory's architecture, plus the training fields the
    user gave. An architecture field set (away from its schema default) to another value than config.json's
    is refused."""
    from core.config import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields = model_fields(path)
    for key, value in given.items():
        if key in TRAINING_FIELDS or key not in fields or value in (None, "???", defaults.get(key)):
            continue
        if value != fields[key]:
            raise ConfigError(
                f"model.{key}={value!r}, but {path}/config.json says {fields[key]!r}. Fix: drop the override "
                "(an HF model's architecture is its config.json's)."
            )
    return {**fields, **{k: v for k, v in given.items() if k in TRAINING_FIELDS}}
