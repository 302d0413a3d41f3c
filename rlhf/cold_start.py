"""The `cold_start_sft` stage (R1 stage 1): collect a previous model's correct, readable outputs, put them in
R1's readable pattern, and fine-tune a model on them.

    python -m rlhf.train stage=cold_start_sft stage.init_from=BASE stage.cold_start.source=R1_ZERO_RUN run_dir=PATH

Data: rollout.n samples per prompt from stage.cold_start.source (R1-Zero), kept by rejection sampling's
filters (verified answer, well-formed, one language, short paragraphs, no code blocks; stage.sampling), then
rewritten as reasoning + stage.cold_start.reasoning_end + stage.cold_start.summary (the paper's
|special_token|<reasoning_process>|special_token|<summary>). The rows land in RUN_DIR/cold_start_data (built
once; a re-run reuses them). With stage.data_from set, those rows are used instead (few-shot or human-written
data). Training is the sft stage's: loss on the response only, packed, stage.epochs.
"""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.errors import ConfigError
from rlhf import rejection_sampling, sft
from rlhf.rewards import extract_answer
from rlhf.rewards.language import reasoning_of

DATA_DIR = "cold_start_data"


def run(cfg: Config) -> dict:
    c = cfg.stage.cold_start
    if not cfg.stage.init_from:
        raise ConfigError("stage=cold_start_sft fine-tunes a model: set stage.init_from (the paper: the base).")
    if not cfg.stage.data_from:
        if not c.source:
            raise ConfigError(
                "stage=cold_start_sft has no data. Fix: set stage.cold_start.source to the run dir "
                "of the model to collect outputs from (R1-Zero), or stage.data_from to ready rows."
            )
        check_pattern(c)
        data = Path(cfg.run_dir) / DATA_DIR
        rejection_sampling.build(cfg, c.source, data, rewrite=lambda rows: [in_pattern(r, c) for r in rows])
        cfg.stage.data_from = str(data)
    return sft.run(cfg)


def in_pattern(row: dict, c) -> dict:
    """A kept sample as reasoning + reasoning_end + summary. Kept samples passed the format check, so
    both the reasoning and the answer are there."""
    reasoning = reasoning_of(row["response"])
    answer = (extract_answer(row["response"], row) or "").strip()
    return {
        **row,
        "response": reasoning + c.reasoning_end + c.summary.format(answer=answer, reasoning=reasoning),
        "source": "cold_start",
    }


def check_pattern(c) -> None:
    try:
        c.summary.format(answer="", reasoning="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"stage.cold_start.summary={c.summary!r} is not a template of {{answer}} and "
            f"{{reasoning}} ({e!r}). Fix: write literal braces as {{{{ and }}}}."
        ) from None
    if not c.reasoning_end:
        raise ConfigError(
            "stage.cold_start.reasoning_end is empty: the pattern needs a token between the "
            "reasoning and the summary. Fix: set it (default </think>)."
        )
