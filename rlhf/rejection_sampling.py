"""The `rejection_sampling` stage (R1 stage 3's data): rollout.n samples per prompt from a model, keep the
verified-correct and clean ones, deduplicate, mix in non-reasoning rows, write a versioned dataset.

    python -m rlhf.train stage=rejection_sampling stage.init_from=STAGE2_RUN_DIR run_dir=PATH

Kept: accuracy 1 and format 1 (the rule rewards; for rows of task "judged", the verdict of the generative
judge sampling.judge on the answer: rlhf.judge), reasoning at least sampling.min_language_share in
data.language, no paragraph over sampling.max_paragraph_chars, no code block; at most
sampling.keep_per_prompt distinct ones per prompt. Writes RUN_DIR/sft.parquet (prompt, response and
provenance columns per row) and RUN_DIR/dataset.json (version = sha256 of the rows, counts per filter,
source checkpoint), which `stage=sft stage.data_from=RUN_DIR` reads. A finished run is not redone.

With sampling.non_reasoning_cot, the same model writes the reasoning of each non-reasoning row whose prompt
has at least cot_min_prompt_chars characters (the paper prompts DeepSeek-V3 for a CoT, none for "hello").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.config import Config
from core.data import DataError
from core.errors import ConfigError
from core.run_tokenizer import run_tokenizer, stop_token_ids
from inference import colocated
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from parallel.policy import build_policy
from rlhf import grpo, non_reasoning, rollout
from rlhf.judge import GenerativeJudge, rule_checkable
from rlhf.prompts import load_prompts
from rlhf.rewards import RewardPool, extract_answer
from rlhf.rewards.language import reasoning_of, wordless
from rlhf.tasks.judge import JUDGED
from rlhf.tool_calls import ToolRunner

log = logging.getLogger("r1stack.rejection_sampling")
CHECKS = {"accuracy": 1.0, "format": 1.0, "language_consistency": 1.0}
DATASET, MANIFEST = "sft.parquet", "dataset.json"


def run(cfg: Config) -> dict:
    if not cfg.stage.init_from:
        raise ConfigError("stage=rejection_sampling samples from a model: set stage.init_from to its run dir.")
    return build(cfg, cfg.stage.init_from, Path(cfg.run_dir))


def build(cfg: Config, model_from: str, out_dir: Path, rewrite=None) -> dict:
    """Collective: samples `model_from`, keeps what the filters pass, applies `rewrite(rows) -> rows` (the
    cold-start pattern), mixes, writes out_dir/sft.parquet + dataset.json; returns the manifest. Once the
    manifest exists the build is not redone."""
    if (out_dir / MANIFEST).exists():
        log.info("%s exists: rejection sampling already done", out_dir / MANIFEST)
        return json.loads((out_dir / MANIFEST).read_text())
    env = P.init_distributed(cfg)
    try:
        rows, counts, source = sample(cfg, model_from, out_dir, rewrite)
        manifest, error = {}, None
        if env.rank == 0:
            try:
                manifest = write(out_dir, rows, counts, source, cfg)
            except DataError as e:
                error = e
        if not P.all_ranks_true(error is None):  # the other ranks must not go on to read a missing dataset
            raise error or DataError(f"rank 0 could not write {out_dir / DATASET}; its log says why")
    finally:
        P.shutdown()
    return manifest


def sample(cfg: Config, model_from: str, out_dir: Path, rewrite=None) -> tuple[list[dict], dict, dict]:
    """The dataset's rows on every rank (the kept ones gathered over data-parallel ranks, rewritten, mixed,
    with CoTs written), the counts per filter, and the source checkpoint."""
    s, r = cfg.stage.sampling, cfg.rollout
    tok = run_tokenizer(cfg, weights_from=model_from, run_dir=out_dir, write=P.rank() == 0)
    prompts = load_prompts(cfg.data, "train", tok, cfg.reward.answer)
    prompts = prompts[: s.prompts] if s.prompts else prompts
    unchecked = not all(map(rule_checkable, prompts))
    if unchecked and not s.judge:
        raise ConfigError(
            f"data={cfg.data.name} has rows of task {JUDGED!r}, which no rule checks. Fix: set "
            "stage.sampling.judge to a generative judge's run dir (stage=sft data=judge trains the "
            "tiny one)."
        )
    policy = build_policy(cfg, with_optimizer=False)
    ckpt.load_weights(policy, model_from)
    judge = GenerativeJudge.of_run(cfg, tok) if unchecked else None
    if ckpt.is_hf_dir(model_from):
        source = {"checkpoint": str(model_from), "step": None}
    else:
        step_dir = ckpt.resolve(ckpt.of_run(model_from))
        source = {"checkpoint": str(step_dir), "step": ckpt.read_meta(step_dir)["step"]}
    engine = colocated.start_engine(cfg, policy, out_dir / "hf_model", tok)
    tools = ToolRunner.from_config(r, tok, cfg.reward.workers)  # samples call the tool as in RL
    counts = {
        "prompts": len(prompts),
        "samples": 0,
        "incorrect": 0,
        "mixed_language": 0,
        "long_paragraph": 0,
        "code_block": 0,
        "duplicate": 0,
        "over_per_prompt": 0,
    }
    kept, judged = [], {"judged": 0, "judged_correct": 0}
    rest = {k: 1.0 for k in CHECKS if k != "accuracy"}  # for judged rows: the judge decides accuracy
    unruled = RewardPool(rest, cfg.reward.timeout_s, cfg.reward.workers) if judge else None
    with (
        engine or contextlib.nullcontext(),
        RewardPool(CHECKS, cfg.reward.timeout_s, cfg.reward.workers) as pool,
        unruled or contextlib.nullcontext(),
    ):
        for start in range(0, len(prompts), s.chunk_prompts * P.data_parallel_size()):
            ids = list(range(start, min(start + s.chunk_prompts * P.data_parallel_size(), len(prompts))))
            mine = ids[P.data_parallel_rank() :: P.data_parallel_size()]
            sampling = rollout.sampling(r, cfg.seed, start, stop_token_ids(tok))
            groups, _ = grpo.generate_and_share(engine, tok, [prompts[i] for i in mine], sampling, tools)
            flat = [x for g in groups for x in g]
            scores = score(flat, pool, unruled, judge, judged)
            k = 0
            for pid, group in zip(mine, groups):
                seen: set[str] = set()
                for j, x in enumerate(group):
                    verdict = screen(x.text, {n: v[k] for n, v in scores.items()}, s, cfg.data.language, seen)
                    k += 1
                    counts["samples"] += 1
                    if verdict == "keep" and s.keep_per_prompt and len(seen) > s.keep_per_prompt:
                        verdict = "over_per_prompt"
                    if verdict != "keep":
                        counts[verdict] += 1
                        continue
                    kept.append(
                        {
                            "prompt": x.row["prompt"],
                            "response": x.text,
                            "source": "rejection_sampling",
                            "prompt_index": pid,
                            "sample_index": j,
                            "task": x.row.get("task") or "",
                            "answer": x.row.get("answer") or "",
                            "seed": sampling.seed,
                            **tool_columns(x),
                        }
                    )
        kept, counts = _gather(kept, {**counts, **judged} if judge else counts)
        rows = non_reasoning.mix(rewrite(kept) if rewrite else kept, cfg)
        if s.non_reasoning_cot:
            rows, counts["cot"] = non_reasoning.write_cots(engine, tok, rows, cfg)
    return rows, counts, source


def tool_columns(x) -> dict:
    """A sample that called a tool keeps its tokens as the engine and the tool made them (the response's
    text re-encoded could tokenize otherwise) and which of them are the tool's: SFT learns the rest only."""
    if not any(x.tool_mask):
        return {}
    ids, mask = x.completion_ids, x.tool_mask
    if x.finish_reason == "stop":  # SFT appends the EOS itself, as for every text response
        ids, mask = ids[:-1], mask[:-1]
    return {"response_ids": ids, "response_tool_mask": mask}


def score(flat: list, pool, unruled, judge, judged: dict) -> dict[str, list[float]]:
    """CHECKS per sample: the rule rewards, or for rows no rule can check the other rules and the generative
    judge's verdict on the answer (counted in `judged`)."""
    out = {name: [0.0] * len(flat) for name in CHECKS}
    ruled = [k for k, x in enumerate(flat) if rule_checkable(x.row)]
    unchecked = [k for k, x in enumerate(flat) if not rule_checkable(x.row)]
    for p, ks in ((pool, ruled), (unruled, unchecked)):
        if ks:
            for name, values in p.score([flat[k].text for k in ks], [flat[k].row for k in ks]).per_reward.items():
                for k, v in zip(ks, values):
                    out[name][k] = v
    answered = [k for k in unchecked if extract_answer(flat[k].text, flat[k].row) is not None]
    if answered:  # every model-parallel peer holds the same samples (generate_and_share): a safe collective
        verdicts = judge.correct(
            [str(flat[k].row.get("answer")) for k in answered],
            [extract_answer(flat[k].text, flat[k].row) for k in answered],
        )
        for k, v in zip(answered, verdicts):
            out["accuracy"][k] = v
        judged["judged"] += len(answered)
        judged["judged_correct"] += int(sum(verdicts))
    return out


def screen(text: str, scores: dict, s, language: str, seen: set[str]) -> str:
    """ "keep", or the first filter the sample fails; a kept text is added to `seen`."""
    reasoning = reasoning_of(text)
    if scores["accuracy"] < 1 or scores["format"] < 1:
        return "incorrect"
    if scores["language_consistency"] < s.min_language_share and not wordless(text):  # words to judge
        return "mixed_language"
    if any(len(p) > s.max_paragraph_chars for p in reasoning.split("\n\n")):
        return "long_paragraph"
    if s.drop_code_blocks and "```" in reasoning:
        return "code_block"
    if text in seen:
        return "duplicate"
    seen.add(text)
    return "keep"


def write(run_dir: Path, rows: list[dict], counts: dict, source: dict, cfg: Config) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise DataError(
            f"rejection sampling kept no rows (counts: {counts}). Fix: sample from a stronger "
            "model, raise rollout.n, or relax stage.sampling filters."
        )
    if any("response_ids" in r for r in rows):  # one schema for every row (pyarrow reads the first row's keys)
        rows = [{"response_ids": [], "response_tool_mask": [], **r} for r in rows]
    version = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"r1stack_version": version})
    tmp = run_dir / (DATASET + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(run_dir / DATASET)
    manifest = {
        "version": version,
        "rows": len(rows),
        "kept": counts["kept"],
        "counts": counts,
        "source": source,
        "non_reasoning": sum(r["source"].startswith("non_reasoning") for r in rows),
        "sampling": dataclasses.asdict(cfg.stage.sampling),
        "rollout_n": cfg.rollout.n,
        "data": cfg.data.name,
    }
    (run_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks the run done
    log.info("rejection sampling: %s", json.dumps(counts))
    return manifest


def _gather(kept: list[dict], counts: dict) -> tuple[list[dict], dict]:
    parts = P.gather_data_parallel((kept, {**counts, "kept": len(kept)}))
    total = {k: sum(c[k] for _, c in parts) for k in parts[0][1]}
    total["prompts"] = counts["prompts"]
    return sorted(
        (row for rows, _ in parts for row in rows), key=lambda x: (x["prompt_index"], x["sample_index"])
    ), total
