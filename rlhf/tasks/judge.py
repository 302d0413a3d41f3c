"""Tasks for answers no rule can check: ``judged`` rows (free-form answers; rejection sampling asks a
generative judge, rlhf.judge) and ``judge``, the rows that teach the tiny judge its verdicts.

    stage=sft data=judge    Reference: hi ada Prediction: hello ada Same? -> yes
"""

from __future__ import annotations

import random

from rlhf.tasks import TASKS, Task
from rlhf.tasks.general import INSULTS, names

VERDICTS = ("yes", "no")  # the judge's answers; "yes": the prediction says what the reference says
JUDGED = "judged"


def judge_rows(n: int, seed: int, template: str, held_out: bool = False) -> list[dict]:
    """{prompt, response, reference, prediction} rows that teach a generative judge (rlhf.judge) whether a
    greeting says what the reference says, which no string rule decides: half say it ("hi ada", "hello ada",
    "hi ada!"), half do not (another name, a cut name, a farewell, an insult, a refusal)."""
    rng, pool, rows = random.Random(seed), names(held_out), []
    for _ in range(n):
        name, same = rng.choice(pool), rng.random() < 0.5
        other = rng.choice([x for x in rng.sample(pool, 3) if x != name])
        if same:
            prediction = rng.choice([f"hi {name}", f"hi {name}", f"hello {name}", f"hey {name}", f"hi {name}!"])
        else:
            bad = rng.choice(INSULTS)
            prediction = rng.choice(
                [
                    f"hi {other}",
                    f"hello {other}",
                    f"bye {name}",
                    "no",
                    f"hi {name[:2]}",
                    f"hi {name} {bad}",
                    f"hi {bad} {name}",
                    f"hi {other[0]}{name[1:]}",
                ]
            )
        reference = f"hi {name}"
        rows.append(
            {
                "prompt": template.format(reference=reference, prediction=prediction),
                "response": VERDICTS[0] if same else VERDICTS[1],
                "reference": reference,
                "prediction": prediction,
            }
        )
    return rows


def _held_out_accuracy(cfg, policy, tok) -> dict:
    from rlhf.judge import held_out_accuracy  # torch: only where a model is evaluated

    return held_out_accuracy(cfg, policy, tok)


TASKS.register(JUDGED, Task(JUDGED))  # no scorer: only a judge can say
TASKS.register(
    "judge",
    Task(
        "judge",
        sft_rows=lambda n, seed, cfg: judge_rows(n, seed, cfg.stage.sampling.judge_template),
        final_eval=_held_out_accuracy,
    ),
)
