"""Held-out evaluation as the R1 paper reports it: k samples per prompt at temperature 0.6, top-p 0.95;
pass@1 is the mean accuracy over all k·N samples, cons@k the accuracy of each prompt's majority answer."""

from __future__ import annotations

from collections import Counter

import torch

from inference.engine import Sampling
from parallel import parallelize as P
from rlhf.rewards import extract_answer
from rlhf.rollout import generate_groups
from rlhf.tasks.addition import starts_with_trace


def evaluate(engine, tok, rows: list[dict], ecfg, pool, max_new_tokens: int) -> dict:
    """Metrics over this DP rank's strided share of `rows`, summed over DP; `engine` None → no share
    generated here (model-parallel peers of an engine rank), the sums come from the others."""
    dp, rank = P.data_parallel_size(), P.data_parallel_rank()
    mine = rows[rank::dp] if engine is not None else []
    sums = torch.zeros(6, dtype=torch.float64)  # prompts, pass@1, cons@k, format, length, reasoning-first
    if mine:
        sampling = Sampling(n=ecfg.k, temperature=ecfg.temperature, top_p=ecfg.top_p,
                            max_new_tokens=ecfg.max_new_tokens or max_new_tokens, seed=ecfg.seed, stop_token_ids=(tok.eos_token_id,))  # fmt: skip
        groups, _ = generate_groups(engine, tok, mine, sampling)
        flat = [s for g in groups for s in g]
        res = pool.score([s.text for s in flat], [s.row for s in flat])
        acc, fmt = res.per_reward["accuracy"], res.per_reward["format"]
        i = 0
        for g in groups:
            a = acc[i : i + len(g)]
            sums += torch.tensor([1, sum(a) / len(g), _consensus(g, a), sum(fmt[i : i + len(g)]) / len(g),
                                  sum(len(s.completion_ids) for s in g) / len(g),
                                  sum(starts_with_trace(s.text) for s in g) / len(g)], dtype=torch.float64)  # fmt: skip
            i += len(g)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)  # every rank; ranks without an engine add zeros
    n = max(float(sums[0]), 1.0)
    out = {"n_prompts": int(sums[0]), "k": ecfg.k, "temperature": ecfg.temperature, "top_p": ecfg.top_p,
           "pass@1": float(sums[1]) / n, f"cons@{ecfg.k}": float(sums[2]) / n, "format": float(sums[3]) / n,
           "response_length": float(sums[4]) / n}  # fmt: skip
    if rows and rows[0].get("task") == "addition":  # the share of answers that start with a column step
        out["reasoning_first"] = float(sums[5]) / n
    return out


def _consensus(group, accuracy: list[float]) -> float:
    """1 if the most common extracted answer (ties: first seen) is a correct one."""
    answers = [(a.strip() if (a := extract_answer(s.text)) is not None else None) for s in group]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return max(acc for a, acc in zip(answers, accuracy) if a == top)
