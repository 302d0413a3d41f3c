"""Held-out evaluation as the R1 paper reports it: k samples per prompt at temperature 0.6, top-p 0.95;
pass@1 is the mean accuracy over all k·N samples, cons@k the accuracy of each prompt's majority answer.
Reported overall and per task, with the response-length distribution; language_consistency too when the
pool scores it (tools.eval's does), over the samples whose reasoning has words, a task's audit rates
(greetings: harmful and ideal shares), for a task that defines it the share of samples that start with its
reasoning, and with a tool (rlhf.tool_calls) how the samples used it."""

from __future__ import annotations

from collections import Counter
from statistics import mean

from core.ledger import phase
from core.run_tokenizer import stop_token_ids
from inference.engine import Sampling
from parallel import parallelize as P
from rlhf.rewards import extract_answer
from rlhf.rewards.language import wordless
from rlhf.rollout import generate_groups
from rlhf.tasks import TASKS
from rlhf.tool_calls import tool_counts

SCORES = {"accuracy": 1.0, "format": 1.0, "language_consistency": 1.0}  # the reward pool evaluate() needs


@phase("eval")
def evaluate(engine, tok, rows: list[dict], ecfg, pool, max_new_tokens: int, tools=None) -> dict:
    """Metrics over this DP rank's strided share of `rows`, gathered over DP; `engine` None → no share
    generated here (model-parallel peers of an engine rank), the records come from the others. With
    `tools` (rlhf.tool_calls.ToolRunner) the samples call them as in training, and the tool's use is reported."""
    return summarize(eval_records(engine, tok, rows, ecfg, pool, max_new_tokens, tools), rows, ecfg)


def eval_records(engine, tok, rows: list[dict], ecfg, pool, max_new_tokens: int, tools=None) -> list[dict]:
    """evaluate's part on this rank alone (no collective, so an overlapped rollout producer's thread may
    run it): one record per prompt of its DP rank's share; none without an engine."""
    dp, rank = P.data_parallel_size(), P.data_parallel_rank()
    mine = rows[rank::dp] if engine is not None else []
    return _score(engine, tok, mine, ecfg, pool, max_new_tokens, tools) if mine else []


@phase("eval")
def summarize(records: list[dict], rows: list[dict], ecfg) -> dict:
    """evaluate's collective part: every rank's records (ranks without an engine send none), aggregated."""
    records = [r for part in P.gather_world(records) for r in part]
    out = {"k": ecfg.k, "temperature": ecfg.temperature, "top_p": ecfg.top_p, **_aggregate(records, ecfg.k)}
    tasks = sorted({r["task"] for r in records})
    if len(tasks) > 1:
        out["per_task"] = {t: _aggregate([r for r in records if r["task"] == t], ecfg.k) for t in tasks}
    first = [r["reasoning_first"] for r in records if r["reasoning_first"] is not None]
    if rows and _task(rows[0]) is not None and _task(rows[0]).reasoning_first is not None:
        out["reasoning_first"] = mean(first) if first else 0.0
    return out


def _score(engine, tok, rows: list[dict], ecfg, pool, max_new_tokens: int, tools=None) -> list[dict]:
    """One record per prompt: its k samples' accuracy, consensus, format (and language) and lengths."""
    sampling = Sampling(
        n=ecfg.k,
        temperature=ecfg.temperature,
        top_p=ecfg.top_p,
        max_new_tokens=ecfg.max_new_tokens or max_new_tokens,
        seed=ecfg.seed,
        stop_token_ids=stop_token_ids(tok),
    )
    groups, _ = generate_groups(engine, tok, rows, sampling, tools)
    flat = [s for g in groups for s in g]
    scores = pool.score([s.text for s in flat], [s.row for s in flat]).per_reward
    records, i = [], 0
    for row, g in zip(rows, groups):
        share = {name: mean(v[i : i + len(g)]) for name, v in scores.items()}
        # language consistency over the samples whose reasoning has words to judge (rlhf.rewards.language)
        judged = scores.get("language_consistency", [])[i : i + len(g)]
        lang = [v for s, v in zip(g, judged) if not wordless(s.text)]
        records.append(
            {
                "task": row.get("task") or "default",
                "pass@1": share["accuracy"],
                "cons": _consensus(g, scores["accuracy"][i : i + len(g)]),
                "format": share["format"],
                "language_consistency": mean(lang) if lang else None,
                "lengths": [s.policy_tokens for s in g],
                "reasoning_first": _reasoning_first(row, g),
                "audit": _audit(row, g),
                "tools": _tool_use(g, scores["accuracy"][i : i + len(g)]) if tools is not None else {},
            }
        )
        i += len(g)
    return records


def _aggregate(records: list[dict], k: int) -> dict:
    n = max(len(records), 1)
    lengths = sorted(x for r in records for x in r["lengths"]) or [0]
    out = {
        "n_prompts": len(records),
        "pass@1": sum(r["pass@1"] for r in records) / n,
        f"cons@{k}": sum(r["cons"] for r in records) / n,
        "format": sum(r["format"] for r in records) / n,
        "response_length": sum(lengths) / len(lengths),
        "response_length_dist": {
            "min": lengths[0],
            "p50": _pct(lengths, 0.5),
            "p90": _pct(lengths, 0.9),
            "max": lengths[-1],
        },
    }
    lang = [r["language_consistency"] for r in records if r["language_consistency"] is not None]
    if lang:
        out["language_consistency"] = sum(lang) / len(lang)
    for name in sorted({name for r in records for name in r.get("tools", {})}):  # tool_calls, tool_use, ...
        out[name] = sum(r["tools"][name] for r in records) / n
    for name in sorted({name for r in records for name in r["audit"]}):
        audited = [r["audit"][name] for r in records if name in r["audit"]]
        out[name] = sum(audited) / len(audited)
    return out


def _tool_use(group, accuracy: list[float]) -> dict[str, float]:
    """Per sample: tool calls run and failed, and the shares of samples that ran one, and that ran one
    without error and answered right."""
    counts = tool_counts(group)
    clean = [bool(s.tool_calls) and all(o.startswith("ok") for o in s.tool_calls) for s in group]
    return {
        "tool_calls": counts["calls"] / len(group),
        "tool_errors": counts["errors"] / len(group),
        "tool_use": counts["used"] / len(group),
        "tool_use_correct": mean(c and a == 1.0 for c, a in zip(clean, accuracy)),
    }


def _task(row: dict):
    return TASKS.find(row.get("task") or "")


def _reasoning_first(row: dict, group) -> float | None:
    task = _task(row)
    if task is None or task.reasoning_first is None or not group:
        return None
    return mean(task.reasoning_first(s.text) for s in group)


def _audit(row: dict, group) -> dict[str, float]:
    task = _task(row)
    if task is None or task.audit is None or not group:
        return {}
    per_sample = [task.audit(s.text, row) for s in group]
    return {name: mean(a[name] for a in per_sample) for name in per_sample[0]}


def _pct(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _consensus(group, accuracy: list[float]) -> float:
    """1 if the most common extracted answer (ties: first seen) is a correct one."""
    answers = [(a.strip() if (a := extract_answer(s.text, s.row)) is not None else None) for s in group]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return max(acc for a, acc in zip(answers, accuracy) if a == top)
