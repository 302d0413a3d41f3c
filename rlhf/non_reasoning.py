"""Non-reasoning rows for R1 stage 3's dataset: mixed in at a share of the result (the paper: 200k of 800k
rows: writing, factual QA, self-cognition, translation), optionally with a CoT the sampled model writes
first (the paper prompts DeepSeek-V3; none for trivial queries such as "hello")."""

from __future__ import annotations

import json
import logging
import random

from core.config import Config
from core.data import DataError, load_rows
from core.run_tokenizer import stop_token_ids
from parallel import parallelize as P
from rlhf import grpo, rollout
from rlhf.rewards.rules import THINK, THINK_END
from rlhf.tasks import TASKS

log = logging.getLogger("r1stack.rejection_sampling")


def mix(kept: list[dict], cfg: Config) -> list[dict]:
    """Adds non-reasoning rows so they make up non_reasoning_share of the result (as many as there are):
    stage.sampling.non_reasoning_path's rows, or the generated SFT rows of the task it names (greet)."""
    s, seed = cfg.stage.sampling, cfg.seed
    if not s.non_reasoning_path:
        return kept
    want = round(len(kept) * s.non_reasoning_share / max(1e-9, 1 - s.non_reasoning_share))
    task = TASKS.find(s.non_reasoning_path)
    if task is not None and task.sft_rows is not None:
        extra = task.sft_rows(want, seed, cfg)
    else:
        extra = load_rows(s.non_reasoning_path, "sft")
    if want > len(extra):
        log.warning(
            "non-reasoning data has %d rows, %d wanted for share %.2f: using all",
            len(extra),
            want,
            s.non_reasoning_share,
        )
    picked = random.Random(seed).sample(range(len(extra)), min(want, len(extra)))
    rows = kept + [
        {
            "prompt": extra[i]["prompt"],
            "response": extra[i]["response"],
            "source": "non_reasoning",
            "prompt_index": i,
            "sample_index": -1,
            "task": "general",
            "answer": "",
            "seed": seed,
        }
        for i in sorted(picked)
    ]
    random.Random(seed).shuffle(rows)
    return rows


def write_cots(engine, tok, rows: list[dict], cfg: Config) -> tuple[list[dict], dict]:
    """Non-reasoning rows with the model's own reasoning: it continues each non-trivial row's prompt up to
    </think>, and that text replaces the row's reasoning. A CoT that never closes, is empty, or fails the
    paragraph and code-block filters leaves the row as it was."""
    s, r = cfg.stage.sampling, cfg.rollout
    given = [i for i, row in enumerate(rows) if row["source"] == "non_reasoning"]
    todo = [i for i in given if len(rows[i]["prompt"]) >= s.cot_min_prompt_chars]
    for i in todo:
        if not rows[i]["prompt"].endswith(THINK) or THINK_END not in rows[i]["response"]:
            raise DataError(
                f"non-reasoning row {rows[i]['prompt_index']} of {s.non_reasoning_path} "
                f"({rows[i]['prompt'][:60]!r}) has no place for a CoT. Fix: end its prompt with "
                f"{THINK} and write its response as REASONING{THINK_END}REST (the reasoning may be "
                "empty), or set stage.sampling.non_reasoning_cot=false."
            )
    mine = todo[P.data_parallel_rank() :: P.data_parallel_size()]
    stop = (tok.convert_tokens_to_ids(THINK_END), *stop_token_ids(tok))
    sampling = rollout.sampling(r, cfg.seed, -1, stop, n=1, max_new_tokens=s.cot_max_new_tokens)
    groups, _ = grpo.generate_and_share(engine, tok, [rows[i] for i in mine], sampling) if mine else ([], 0)
    mine_cots = {i: g[0].text.split(THINK_END)[0] for i, g in zip(mine, groups) if THINK_END in g[0].text}
    cots = {i: cot for part in P.gather_data_parallel(mine_cots) for i, cot in part.items()}
    counts = {"trivial": len(given) - len(todo), "unfinished": len(todo) - len(cots), "rejected": 0, "written": 0}
    out = list(rows)
    for i, cot in sorted(cots.items()):
        long = any(len(p) > s.max_paragraph_chars for p in cot.split("\n\n"))
        if not cot.strip() or long or (s.drop_code_blocks and "```" in cot):
            counts["rejected"] += 1
            continue
        rest = rows[i]["response"][rows[i]["response"].index(THINK_END) :]
        out[i] = {**rows[i], "response": cot + rest, "source": "non_reasoning_cot"}
        counts["written"] += 1
    log.info("non-reasoning CoTs: %s", json.dumps(counts))
    return out, counts
