"""The `pretrain` stage: next-token training of the base model on packed text (data.task's generated
pretraining text, or a file of {"text"} rows), then data.task's held-out check. The loop is rlhf.trainer's.
"""

from __future__ import annotations

import random

import torch

from core.config import Config
from core.data import load_rows, pack
from core.errors import ConfigError
from rlhf import trainer
from rlhf.tasks import TASKS


def run(cfg: Config) -> dict:
    return trainer.run(cfg, trainer.Supervised(packed_texts))


def load_texts(cfg: Config) -> list[str]:
    d = cfg.data
    if d.source == "generated":
        texts = TASKS.get(d.task).need("pretraining_text", "data.task", "stage=pretrain")(d.num_train, d.seed)
        if d.general_task:  # general text in the corpus too, as a base model sees the web's: of uneven quality
            if not 0 < d.general_share < 1:
                raise ConfigError(f"data.general_share={d.general_share}: expected a share in (0, 1).")
            rows = TASKS.get(d.general_task, "data.general_task").need(
                "sft_rows", "data.general_task", "general pretraining text"
            )
            n = round(len(texts) * d.general_share / (1 - d.general_share))
            texts += [r["prompt"] + r["response"] for r in rows(n, d.seed, cfg)]
            random.Random(d.seed).shuffle(texts)
        return texts
    if d.source in ("jsonl", "parquet"):
        if not d.train_path:
            raise ConfigError(f"data.source={d.source} needs data.train_path (a file with a 'text' field per row).")
        return [row["text"] for row in load_rows(d.train_path, "text")]
    raise ConfigError(f"data.source={d.source!r}: expected generated, jsonl or parquet.")


def pack_texts(texts: list[str], tok, seq_len: int, chunk: int = 256) -> dict[str, torch.Tensor]:
    """bos + text + eos per sample, packed into rows of seq_len. Packing runs per chunk of samples
    because first-fit over the whole corpus is quadratic."""
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    samples = [{"input_ids": x + [tok.eos_token_id]} for x in ids]
    parts = [pack(samples[i : i + chunk], seq_len, tok.pad_token_id) for i in range(0, len(samples), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def packed_texts(cfg: Config, tok) -> dict[str, torch.Tensor]:
    return pack_texts(load_texts(cfg), tok, cfg.stage.train.seq_length)
