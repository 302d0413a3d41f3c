"""The `reward_model` stage: a Bradley–Terry reward model, the policy's architecture with a scalar head,
trained on preference pairs; R1 stage 4 scores helpfulness and harmlessness with such models.

    python -m rlhf.train stage=reward_model stage.init_from=SFT_RUN stage.data_from=PAIRS.jsonl run_dir=PATH

PAIRS: {prompt, chosen, rejected} rows (JSONL or Parquet). Without stage.data_from, data.task's generated
pairs: data=preference_helpful or data=preference_harmless, the tiny greeting task's (rlhf.tasks.general). Each pair is one
packed row, chosen and rejected as two segments that cannot see each other; the score is the head's output
at each response's eos, and the loss is −log σ(score(chosen) − score(rejected)). stage.view=summary trains
it on the summaries only (R1's helpfulness model); checkpoints record the view, which rlhf.rewards.compose
applies when scoring. The training loop, resume and tracking are rlhf.trainer's; the held-out check is the share
of eval pairs ranked right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.config import Config
from core.data import DataError, load_rows
from core.errors import ConfigError
from parallel import parallelize as P
from parallel.policy import eval_mode
from parallel.step import forward_backward
from rlhf import trainer
from rlhf.tasks import TASKS


def run(cfg: Config) -> dict:
    return trainer.run(cfg, trainer.Supervised(packed, bradley_terry, "scalar", pair_accuracy))


def pairs(cfg: Config, split: str) -> list[dict]:
    d = cfg.data
    if split == "train" and cfg.stage.data_from:
        return load_rows(cfg.stage.data_from, "preference")
    if split == "eval" and d.eval_path:
        return load_rows(d.eval_path, "preference")
    task = TASKS.get(d.task) if d.source == "generated" else None
    if task is not None and task.preference_pairs is not None:
        n, seed = (d.num_train, d.seed) if split == "train" else (d.num_eval, d.seed + 1)
        return task.preference_pairs(n, seed, split == "eval")
    if split == "eval":
        return []
    if task is not None:
        task.need(
            "preference_pairs",
            "data.task",
            "stage=reward_model",
            "set stage.data_from=FILE ({prompt, chosen, rejected} rows)",
        )
    raise ConfigError(
        "stage=reward_model has no preference pairs. Fix: set stage.data_from=FILE ({prompt, chosen, "
        "rejected} rows) or data=preference_helpful / data=preference_harmless."
    )


def packed(cfg: Config, tok, split: str = "train") -> dict:
    """One row per pair: [bos prompt chosen eos | bos prompt rejected eos | pad], "ends" = both eos positions."""
    seq = cfg.stage.train.seq_length
    rows = []
    for i, r in enumerate(pairs(cfg, split)):
        both = [
            encode(tok, r["prompt"], view(response, cfg.stage.view, cfg.stage.cold_start.reasoning_end))
            for response in (r["chosen"], r["rejected"])
        ]
        if sum(map(len, both)) > seq:
            raise DataError(
                f"preference pair {i}: prompt with chosen and with rejected take more than "
                f"stage.train.seq_length={seq} tokens together. Fix: raise seq_length or shorten it."
            )
        rows.append(both)
    return scored_rows(rows, seq, tok.pad_token_id, segments=2)


def scored_rows(rows: list[list[list[int]]], width: int, pad_id: int, segments: int) -> dict:
    """A reward model's input: each row holds `segments` token sequences side by side that cannot see each
    other, then padding; "ends" holds each sequence's last position, where the head's score is read."""
    n = len(rows)
    out = {
        "tokens": torch.full((n, width), pad_id),
        "labels": torch.zeros(n, width, dtype=torch.long),
        "position_ids": torch.zeros(n, width, dtype=torch.long),
        "loss_mask": torch.zeros(n, width),
        "segment_ids": torch.full((n, width), -1),
        "ends": torch.zeros(n, segments, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        start = 0
        for j, ids in enumerate(row):
            out["tokens"][i, start : start + len(ids)] = torch.tensor(ids)
            out["position_ids"][i, start : start + len(ids)] = torch.arange(len(ids))
            out["segment_ids"][i, start : start + len(ids)] = j
            out["ends"][i, j] = start + len(ids) - 1
            start += len(ids)
    return out


def view(response: str, part: str, reasoning_end: str) -> str:
    """The part of a response a reward model reads: all of it, or the summary after the reasoning ("" if the
    reasoning never ends: there is no summary to judge)."""
    if part == "full":
        return response
    return response.rsplit(reasoning_end, 1)[1] if reasoning_end in response else ""


def encode(tok, prompt: str, response: str) -> list[int]:
    return [tok.bos_token_id] + tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def bradley_terry(batch: dict, model):
    scores = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

    def loss_fn(out):
        at_ends = out[..., 0].float().gather(1, batch["ends"])  # [b, 2]: chosen, rejected
        margin = at_ends[:, 0] - at_ends[:, 1]
        loss = -F.logsigmoid(margin).sum()
        n = torch.tensor(margin.numel(), dtype=torch.int)
        return (
            loss,
            n,
            {"loss": torch.stack([loss.detach(), n.float()]), "right": (margin > 0).float().sum(), "pairs": n.float()},
        )

    return scores, loss_fn


@torch.no_grad()
def pair_accuracy(cfg: Config, policy, tok) -> dict:
    """Collective: the share of held-out pairs whose chosen response scores higher."""
    from core.data import micro_batches

    data = packed(cfg, tok, "eval")
    n = data["tokens"].shape[0]
    if n == 0:
        return {"eval/note": "skipped: no held-out preference pairs (data.eval_path)"}
    mine = P.split_for_data_parallel(list(range(n)))
    with eval_mode(policy):
        out = forward_backward(
            policy,
            micro_batches(data, mine, cfg.stage.train.micro_batch_size),
            forward_only=True,
            forward=bradley_terry,
        )
    sums = P.reduce_sums(out, ["right", "pairs"])
    return {"eval/pair_accuracy": sums["right"] / max(sums["pairs"], 1), "eval/pairs": int(sums["pairs"])}
