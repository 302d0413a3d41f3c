"""An exported HF directory answers a chat prompt the same in vLLM and transformers, with no other files.

    python tests/dist/export_chat_worker.py EXPORT_DIR OUT.json

Greedy, fp32, the export's own tokenizer, chat template and stop ids (generation_config.json).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NEW_TOKENS = 8


def main() -> None:
    import torch
    import transformers

    from core.run_tokenizer import read_tokenizer, stop_token_ids
    from inference.engine import Sampling, build_engine
    from rlhf.prompts import prompt_ids, render_chat

    export, out = Path(sys.argv[1]), Path(sys.argv[2])
    tok = read_tokenizer(export, "the export")
    ids = prompt_ids(tok, {"prompt": render_chat(tok, "What is 12+30?", None, True), "chat": True})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    engine = build_engine("vllm", model_dir=str(export), max_model_len=256, kv_cache_bytes=128 * 2**20)
    with engine:
        done = engine.generate([ids], Sampling(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS, seed=0))
    out.write_text(
        json.dumps(
            {
                "transformers": hf[0, len(ids) :].tolist(),
                "vllm": done.completions[0][0].token_ids,
                "stop_ids": list(stop_token_ids(tok)),
                "chat_template": bool(tok.chat_template),
            }
        )
    )


if __name__ == "__main__":
    main()
