"""Exported HF directories answer a chat prompt the same in vLLM and transformers, with no other files.

    python tests/dist/export_chat_worker.py OUT.json DIR [DIR ...]

Each DIR is an HF export, or a run dir, which is first exported to DIR/hf with `tools.convert export` (in
this process, so that several families share one start of megatron, transformers and vLLM). Greedy, fp32,
the export's own tokenizer, chat template and stop ids (generation_config.json). OUT.json maps each DIR
to what both said.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NEW_TOKENS = 8


def exported(d: Path) -> Path:
    """`d` itself when it is an HF directory, else its run's checkpoint exported to d/hf."""
    from parallel import checkpoint as ckpt
    from tools.convert import convert

    if ckpt.is_hf_dir(d):
        return d
    model = json.loads((d / "config.json").read_text())["model"]
    convert("export", d / "checkpoints", d / "hf", [f"model={model['name']}", f"model.path={model['path']}"])
    return d / "hf"


def chat(export: Path) -> dict:
    import torch
    import transformers

    from core.run_tokenizer import read_tokenizer, stop_token_ids
    from inference.engine import Sampling, build_engine
    from rlhf.prompts import prompt_ids, render_chat

    tok = read_tokenizer(export, "the export")
    ids = prompt_ids(tok, {"prompt": render_chat(tok, "What is 12+30?", None, True), "chat": True})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = hf.sequences[0, len(ids) :]
    hf_logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(hf.logits, tokens)]
    del model
    engine = build_engine("vllm", model_dir=str(export), max_model_len=256, kv_cache_bytes=128 * 2**20)
    with engine:
        done = engine.generate([ids], Sampling(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS, seed=0))
    del engine
    gc.collect()
    said = done.completions[0][0]
    return {
        "transformers": tokens.tolist(),
        "vllm": said.token_ids,
        # Log-probs of the tokens each chose: a stricter check than equal tokens where a random model repeats one.
        "logprob_gap": max(abs(a - b) for a, b in zip(hf_logprobs, said.logprobs)),
        "stop_ids": list(stop_token_ids(tok)),
        "chat_template": bool(tok.chat_template),
    }


def main() -> None:
    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    out.write_text(json.dumps({str(d): chat(exported(d)) for d in dirs}))


if __name__ == "__main__":
    main()
