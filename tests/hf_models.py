"""Tiny Hugging Face model directories with real tokenizers, built locally (random weights, no hub).

    make_hf_model("qwen3", tmp_path / "qwen3")  -> the directory: config.json, model.safetensors,
                                                   tokenizer files, chat template, generation_config.json

Qwen's tokenizer (151,669 tokens) for the qwen2/qwen3 families, DeepSeek-V3's (129,280) for llama and
deepseek_v3, as `make setup` puts them under .venv/tokenizers (tools/fetch_tokenizers.py). Sizes are the
smallest vLLM's CPU backend serves: head_dim 32 (MLA: DeepSeek's real latent sizes, kv_lora_rank 512 and a
64-dim rope key).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZERS = Path(os.environ.get("R1_TEST_TOKENIZERS", ROOT / ".venv" / "tokenizers"))
FAMILY_TOKENIZER = {"qwen2": "qwen", "qwen3": "qwen", "llama": "deepseek_v3", "deepseek_v3": "deepseek_v3"}
FAMILIES = tuple(FAMILY_TOKENIZER)


def tokenizer_dir(family: str) -> Path:
    d = TOKENIZERS / FAMILY_TOKENIZER[family]
    if not (d / "tokenizer.json").exists():
        raise FileNotFoundError(f"{d}: no tokenizer. Run `make setup` (python -m tools.fetch_tokenizers).")
    return d


def hf_config(family: str, vocab_size: int):
    import transformers

    dense = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if family == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **dense)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(tie_word_embeddings=True, **dense)
    elif family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, rope_parameters=rope, **dense)
    elif family == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=512,
            q_lora_rank=32,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            max_position_embeddings=512,
            rope_interleave=True,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
        # vLLM's DeepseekV3 reads these remote-code fields, which transformers 5 no longer writes.
        cfg.scoring_func, cfg.topk_method = "sigmoid", "noaux_tc"
    else:
        raise ValueError(family)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def make_hf_model(family: str, out: Path, seed: int = 0) -> Path:
    """A random-weight `family` model with its real tokenizer in `out` (built once per path)."""
    import torch
    import transformers

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    tok_dir = tokenizer_dir(family)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    cfg = hf_config(family, len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(out))
    for f in tok_dir.iterdir():  # the tokenizer files as the model ships them (generation_config.json too)
        shutil.copy(f, out / f.name)
    return out


def write_rows(out: Path) -> dict[str, Path]:
    """A few rows in public layouts, as JSONL files in `out`: GSM8K (DATA), chat SFT rows (CHATS), MATH (MATH)."""
    questions = [f"Tom has {a} apples and buys {a + 3} more. How many?" for a in range(4)]
    gsm8k = [{"question": q, "answer": f"{a}+{a + 3}\n#### {2 * a + 3}"} for a, q in enumerate(questions)]
    reply = "<think>\n0+3=3</think><answer>3</answer>"
    chats = [{"messages": [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": reply}]}]
    math = [{"problem": f"Compute {a}/2.", "solution": f"It is $\\boxed{{\\frac{{{a}}}{{2}}}}$."} for a in range(3)]
    files = {"DATA": gsm8k, "CHATS": chats, "MATH": math}
    for name, rows in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: out / f"{name}.jsonl" for name in files}
