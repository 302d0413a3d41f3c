"""The `sft` stage: supervised fine-tuning of a model (stage.init_from) on (prompt, response) rows, loss on
the response and its eos only, samples packed into rows of train.seq_length. The training loop, resume and
tracking are rlhf.trainer's; only the data and the start differ.

    python -m rlhf.train stage=sft stage.init_from=BASE_RUN_DIR stage.data_from=DATA run_dir=PATH

DATA: a JSONL or Parquet file of {"prompt", "response"} rows, or a directory holding sft.parquet or
sft.jsonl (what the rejection-sampling stage writes). Without stage.data_from: data.train_path, or the
generated SFT rows of data.task (rlhf.tasks: addition's correct traces, judge's verdict rows). The
summary's held-out check is data.task's.
stage.epochs sets the step count (paper: 2 epochs).
"""

from __future__ import annotations

import math
from pathlib import Path

from core.config import Config
from core.data import DataError, load_rows, pack, tokenize_sft
from core.errors import ConfigError
from rlhf import trainer
from rlhf.tasks import TASKS

DATA_FILES = ("sft.parquet", "sft.jsonl")


def run(cfg: Config) -> dict:
    name = cfg.stage.name
    if not cfg.stage.init_from:
        raise ConfigError(f"stage={name} fine-tunes a model: set stage.init_from to a run dir or checkpoint dir.")
    if name == "distill" and not cfg.stage.data_from:
        raise ConfigError(
            "stage=distill learns the teacher's samples: set stage.data_from to the rejection_sampling "
            "run dir (or a prompt/response file)."
        )
    return trainer.run(cfg, trainer.Supervised(packed))


def rows(cfg: Config) -> list[dict]:
    if cfg.stage.data_from:
        return load_rows(data_file(cfg.stage.data_from), "sft")
    d = cfg.data
    if d.source in ("jsonl", "parquet") and d.train_path:
        return load_rows(d.train_path, "sft")
    if d.source == "generated":
        make = TASKS.get(d.task).need(
            "sft_rows", "data.task", f"stage={cfg.stage.name}", "set stage.data_from=FILE_OR_DIR (prompt/response rows)"
        )
        return make(d.num_train, d.seed, cfg)
    raise ConfigError(
        "stage=sft has no data. Fix: set stage.data_from=FILE_OR_DIR (prompt/response rows), "
        "or data=jsonl data.train_path=FILE."
    )


def data_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in DATA_FILES:
            if (p / name).is_file():
                return p / name
        raise DataError(
            f"stage.data_from={path}: a directory without {' or '.join(DATA_FILES)}; "
            "point it at the rows file or the run dir of the stage that wrote them"
        )
    return p


def packed(cfg: Config, tok) -> dict:
    """Tokenised, packed rows; sets train.steps from stage.epochs when that is given."""
    t = cfg.stage.train
    samples = tokenize_sft(rows(cfg), tok, t.seq_length)
    data = pack(samples, t.seq_length, tok.pad_token_id)
    if cfg.stage.epochs:
        t.steps = math.ceil(cfg.stage.epochs * data["tokens"].shape[0] / t.global_batch_size)
    return data
