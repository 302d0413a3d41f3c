"""The addition task's held-out check after pretraining or SFT: greedy and sampled decoding of held-out
problems by the trained model itself, in process (the tiny model needs no engine for it)."""

from __future__ import annotations

import torch

from core.data import causal_mask
from parallel import parallelize as P
from parallel.policy import Policy, unwrap
from rlhf.tasks import addition

MAX_NEW_TOKENS, SEED = 48, 0


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    vocab: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy (temperature 0) or sampled decoding that recomputes the full forward per token; fine for
    a tiny model. Prompts must share one length; finished rows leave the batch."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate: prompts must all have the same length")
    cur, alive = torch.tensor(prompts), torch.arange(len(prompts))
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        s = cur.shape[1]
        logits = model(cur, torch.arange(s).expand_as(cur), causal_mask(s))[:, -1, :vocab].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        for i, t in zip(alive.tolist(), nxt.tolist()):
            out[i].append(t)
        keep = nxt != eos_id
        cur, alive = torch.cat([cur, nxt[:, None]], 1)[keep], alive[keep]
        if not len(alive):
            break
    return out


def heldout_eval(policy: Policy, tok, n: int, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Held-out addition: pass@1 and reasoning-first share, greedy and sampled at temperature 1.

    With the demo's pretraining mix (55% bare answers) greedy decoding mostly takes the bare branch, whose
    answers a tiny model cannot compute; the sampled numbers are the ones that show what RL can select from.
    """
    rows = addition.eval_prompts(n, SEED)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    model = unwrap(policy.chunks[0])
    model.eval()
    result: dict = {"eval/n": n}
    try:
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            gen = torch.Generator().manual_seed(SEED)
            ids = generate(model, prompts, max_new_tokens, tok.eos_token_id, len(tok), temp, gen)
            texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
            result[f"eval/pass@1_{mode}"] = sum(addition.score(t, r["answer"]) for t, r in zip(texts, rows)) / n
            result[f"eval/reasoning_first_{mode}"] = sum(map(addition.starts_with_trace, texts)) / n
            result[f"eval/examples_{mode}"] = [r["prompt"] + t for r, t in zip(rows[:3], texts[:3])]
    finally:
        model.train()
    return result


def final_eval(cfg, policy: Policy, tok) -> dict:
    """Collective (every rank calls it); rank 0 decodes."""
    if not cfg.parallel.unsharded:
        return {"eval/note": "skipped: held-out decoding runs only without model parallelism"}
    return heldout_eval(policy, tok, cfg.data.num_eval) if P.is_rank0() else {}
