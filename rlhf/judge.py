"""A generative judge for answers no rule can check (R1 stage 3 asks DeepSeek-V3 with the ground truth and
the prediction): a language model prompted with stage.sampling.judge_template, whose verdict is whichever
of VERDICTS it finds likelier next. Rows of task "judged" (free-form answers) need it.

`stage=sft data=judge` trains the tiny one: greetings against a reference greeting, equivalent ones ("hello
ada" for "hi ada") and wrong ones (another name, an insult: rlhf.tasks.judge.judge_rows).
"""

from __future__ import annotations

import torch

from core.errors import ConfigError
from parallel import checkpoint as ckpt
from parallel import parallelize as P
from rlhf.rollout import Sample, to_batch
from rlhf.tasks import TASKS
from rlhf.tasks.judge import JUDGED, VERDICTS, judge_rows


def rule_checkable(row: dict) -> bool:
    task = TASKS.find(row.get("task"))
    return task is None or task.rule_checkable  # an unknown task fails at load, not here


def refuse_judged(rows: list[dict], where: str) -> None:
    """Only rejection sampling has a judge: elsewhere a judged row could never be scored."""
    if any(not rule_checkable(r) for r in rows):
        raise ConfigError(
            f"{where}: rows of task {JUDGED!r} have no rule reward, and only stage=rejection_sampling "
            "asks a generative judge (stage.sampling.judge). Fix: give those rows a task with a scorer, "
            "or use them in rejection sampling."
        )


class GenerativeJudge:
    """A frozen language model (any layout) prompted with `template`."""

    def __init__(self, model, tok, template: str, micro_batch_size: int):
        self.model, self.tok, self.template, self.micro = model, tok, template, micro_batch_size
        self.context = model.cfg.model.max_position_embeddings
        self.verdicts = [tok(v, add_special_tokens=False)["input_ids"] for v in VERDICTS]

    @classmethod
    def of_run(cls, cfg, tok) -> "GenerativeJudge":
        """Collective: stage.sampling.judge's model at this run's parallel layout."""
        s = cfg.stage.sampling
        model, _ = ckpt.load_frozen(cfg, s.judge, "lm", "stage.sampling.judge", tok)
        return cls(model, tok, s.judge_template, cfg.stage.train.micro_batch_size)

    @torch.no_grad()
    def correct(self, references: list[str], predictions: list[str]) -> list[float]:
        """1.0 where the judge says the prediction matches its reference. Collective over the model-parallel
        group, whose ranks must pass the same lists; a prompt past the judge's context is judged wrong."""
        from rlhf import grpo

        prompts = [
            self.tok(self.template.format(reference=r, prediction=p))["input_ids"]
            for r, p in zip(references, predictions)
        ]
        fits = [i for i, p in enumerate(prompts) if len(p) + max(map(len, self.verdicts)) <= self.context]
        out = [0.0] * len(prompts)
        if not fits:
            return out
        samples = [Sample({}, prompts[i], v, [0.0] * len(v), "stop") for i in fits for v in self.verdicts]
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples) - 1
        batch = to_batch(samples, width, self.tok.pad_token_id)
        logp, _ = grpo.logprobs(self.model, batch, self.micro, 1.0)
        totals = P.from_last_stage((logp * batch["loss_mask"]).sum(1))
        per_verdict = totals.view(len(fits), len(self.verdicts))
        for i, row in zip(fits, per_verdict):
            out[i] = float(VERDICTS[int(row.argmax())] == "yes")
        return out


def held_out_accuracy(cfg, policy, tok) -> dict:
    """Collective: the share of data.num_eval held-out judge rows (names never trained on) the model gets right."""
    rows = judge_rows(cfg.data.num_eval, cfg.data.seed + 1, cfg.stage.sampling.judge_template, held_out=True)
    judge = GenerativeJudge(policy, tok, cfg.stage.sampling.judge_template, cfg.stage.train.micro_batch_size)
    said = judge.correct([r["reference"] for r in rows], [r["prediction"] for r in rows])
    right = [float(v == (r["response"] == VERDICTS[0])) for v, r in zip(said, rows)]
    return {"eval/judge_accuracy": sum(right) / max(len(right), 1), "eval/judge_rows": len(right)}
