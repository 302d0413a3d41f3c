"""`model=hf model.path=DIR` against transformers, for locally built HF directories with real tokenizers.

    python tests/dist/hf_dir_worker.py WORKDIR OUT.json FAMILY...

Per family: build the directory (tests/hf_models.py); compose model=hf (the architecture through
megatron-bridge); NaN-fill the policy, import the directory's weights (stage.init_from's path); logits of a
chat-rendered prompt against transformers; the same as a frozen teacher (load_frozen) of a run of another
model; save_hf with the run tokenizer, then transformers loads that
export and gives the same logits, and the export carries the tokenizer files, chat template and stop ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import parallel  # noqa: E402,F401
from core.compose import compose  # noqa: E402
from core.data import causal_mask  # noqa: E402
from core.errors import ConfigError  # noqa: E402
from core.run_tokenizer import run_tokenizer, stop_token_ids  # noqa: E402
from parallel import checkpoint as ckpt  # noqa: E402
from parallel import hf_bridge  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from parallel.policy import build_policy, unwrap  # noqa: E402
from parallel.step import forward_backward  # noqa: E402
from rlhf.prompts import prompt_ids, render_chat  # noqa: E402
from tests.dist.hf_bridge_worker import logits_forward  # noqa: E402
from tests.hf_models import make_hf_model  # noqa: E402


def _hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def run_family(family: str, workdir: Path) -> dict:
    hf_dir = make_hf_model(family, workdir / family)
    cfg = compose(["model=hf", f"model.path={hf_dir}", f"stage.init_from={hf_dir}", "logger=none"])
    P.shutdown_model_parallel()
    P.init_distributed(cfg)
    tok = run_tokenizer(cfg)
    policy = build_policy(cfg, with_optimizer=False)
    with torch.no_grad():
        for c in policy.chunks:
            for p in unwrap(c).parameters():
                p.fill_(float("nan"))
    ckpt.load_weights(policy, hf_dir)
    # transformers has no MTP module, so an HF directory has no MTP weights: those keep their NaN here
    never_written = sorted(
        n for c in policy.chunks for n, p in unwrap(c).named_parameters() if torch.isnan(p).any() and ".mtp." not in f".{n}"
    )

    row = {"prompt": render_chat(tok, "What is 385+47?", "Think step by step.", True), "chat": True}
    ids = prompt_ids(tok, row)
    tokens = torch.tensor([ids])
    s = tokens.shape[1]
    mb = dict(tokens=tokens, position_ids=torch.arange(s)[None], attention_mask=causal_mask(s))
    for c in policy.chunks:
        c.eval()
    with torch.no_grad():
        ours = forward_backward(policy, [mb], forward_only=True, forward=logits_forward)[0]["logits"]
    ref = _hf_logits(hf_dir, tokens)
    vocab = cfg.model.vocab_size
    # The directory as a frozen teacher or judge for a run of another model (any preset): its own architecture.
    frozen, _ = ckpt.load_frozen(compose(["logger=none"]), hf_dir, "lm", "stage.rl.teacher", tok)
    for c in frozen.chunks:
        c.eval()
    with torch.no_grad():
        as_frozen = forward_backward(frozen, [mb], forward_only=True, forward=logits_forward)[0]["logits"]
    try:
        ckpt.load_frozen(cfg, hf_dir, "scalar", "reward.models.helpful.path", tok)
        rm_refusal = None
    except ConfigError as e:
        rm_refusal = str(e)
    export = workdir / f"{family}_export"
    hf_bridge.save_hf(policy, export, tokenizer=tok, include_mtp=False)
    gen = json.loads((export / "generation_config.json").read_text())
    return dict(
        family=family,
        model_family=cfg.model.family,
        vocab_size=vocab,
        tokenizer_len=len(tok),
        prompt_tokens=len(ids),
        bos_count=ids.count(tok.bos_token_id) if tok.bos_token_id is not None else None,
        never_written=never_written,
        logits_max_diff=float((ours[..., :vocab].float() - ref).abs().max()),
        logits_scale=float(ref.abs().max()),
        rm_refusal=rm_refusal,
        frozen_logits_max_diff=float((as_frozen[..., :vocab].float() - ref).abs().max()),
        export_logits_max_diff=float((_hf_logits(export, tokens) - ref).abs().max()),
        export_files=sorted(f.name for f in export.iterdir()),
        export_stop_ids=sorted(gen["eos_token_id"]),
        stop_ids=list(stop_token_ids(tok)),
    )


def main() -> None:
    torch.set_num_threads(1)
    workdir, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = [run_family(f, workdir) for f in sys.argv[3:]]
    out.write_text(json.dumps(results, indent=1))
    P.shutdown()


if __name__ == "__main__":
    main()
