"""Real tokenizers for the tests, taken from PyPI wheels (no model hub is needed):

    python -m tools.fetch_tokenizers [DEST]     (default .venv/tokenizers; `make setup` runs it)

* deepseek_v3/: DeepSeek-V3/R1's tokenizer (129,280 tokens, MIT), shipped in the litellm wheel, with
  DeepSeek-V3's chat template (`<｜User｜>…<｜Assistant｜>`; data.think_prefix adds R1's `<think>\\n`).
* qwen/: Qwen2.5/Qwen3's byte-level BPE (151,643 ranks, Apache-2.0), shipped as qwen.tiktoken in the
  dashscope wheel, converted to tokenizer.json with transformers' tiktoken converter, Qwen's 26 special
  tokens after it (151,669 tokens; `<think>` 151667) and a ChatML chat template.

Only the two files are read out of the wheels (zip archives); nothing is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEELS = {
    "deepseek_v3": ("litellm==1.110.2", "litellm/litellm_core_utils/tokenizers/deepseek_tokenizer.json"),
    "qwen": ("dashscope==2.0.2", "dashscope/resources/qwen.tiktoken"),
}
DEEPSEEK_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
QWEN_CHAT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]  # fmt: skip
QWEN_PLAIN = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def _from_wheel(requirement: str, member: str, workdir: Path) -> bytes:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(workdir)],
        check=True,
    )
    name = requirement.split("==")[0]
    wheel = next(workdir.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def _deepseek(raw: bytes, out: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(raw.decode()),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = DEEPSEEK_CHAT
    _save(tok, out)


def _qwen(raw: bytes, out: Path, workdir: Path) -> None:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import TikTokenConverter

    ranks = workdir / "qwen.tiktoken"
    ranks.write_bytes(raw)
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    backend.add_tokens([AddedToken(t, special=t not in QWEN_PLAIN, normalized=False) for t in QWEN_SPECIAL])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    tok.chat_template = QWEN_CHAT
    _save(tok, out)
    # Qwen's instruct models stop on <|endoftext|> as well as <|im_end|> (their generation_config.json).
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}) + "\n")


def _save(tok, out: Path) -> None:
    from core.tokenizer import save_tokenizer

    save_tokenizer(tok, out)


def fetch(dest: Path) -> None:
    for name, (requirement, member) in WHEELS.items():
        out = dest / name
        template = out / "chat_template.jinja"
        if template.is_file() and template.read_text() == (DEEPSEEK_CHAT if name == "deepseek_v3" else QWEN_CHAT):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            raw = _from_wheel(requirement, member, Path(tmp))
            if name == "deepseek_v3":
                _deepseek(raw, out)
            else:
                _qwen(raw, out, Path(tmp))
        print(f"{out}: tokenizer from {requirement}")


if __name__ == "__main__":
    fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/tokenizers"))
