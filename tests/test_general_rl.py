"""general_rl (R1 stage 4): reward models score the general prompts of a mixed batch (helpfulness on the
summary only, harmlessness on the whole response), rule rewards the reasoning ones, and GRPO raises the
reward models' scores. Whether that makes a better greeter depends on the reward models: at this size they
get hacked (README, stage 4)."""

import json
import math

import pytest

from core.compose import compose
from core.errors import ConfigError
from tests.conftest import train_cli

RL = [
    "stage=general_rl",
    "stage.train.steps=12",
    "data.num_train=600",
    "data.num_eval=60",
    "data.general_share=0.75",
    "logger=none",
]


def test_a_reward_model_ranks_held_out_pairs_and_is_no_policy(greeter, tmp_path):
    """The reward_model stage: a scalar head on a language model's body learns held-out preference pairs
    (Bradley-Terry; insults the names never seen in training), and its checkpoint is refused as a policy."""
    rm = greeter / "harmless"
    summary = json.loads((rm / "train_summary.json").read_text())
    metrics = [json.loads(x) for x in (rm / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval/pairs"] == 200 and summary["eval/pair_accuracy"] >= 0.9
    assert metrics[-1]["train/loss"] < 0.5 * metrics[0]["train/loss"]  # starts near log 2
    meta = json.loads((rm / "checkpoints" / "step_00000100" / "r1stack.json").read_text())
    assert meta["head"] == "scalar" and meta["extra"]["view"]["part"] == "full"
    # a reward model is no policy: loading it as one names both kinds
    out = train_cli(
        "stage=sft",
        f"stage.init_from={rm}",
        "data.num_train=8",
        f"run_dir={tmp_path / 'x'}",
        "logger=none",
        check=False,
    )
    assert out.returncode == 2 and "holds a 'scalar'-head model" in out.stderr


def test_reward_models_read_their_view(greeter, P):
    from core.tokenizer import build_char_tokenizer
    from rlhf.rewards.compose import RewardModel
    from rlhf.tasks import general

    cfg = compose(["stage=general_rl"])
    tok = build_char_tokenizer()
    helpful = RewardModel(cfg, "helpful", str(greeter / "helpful"), tok)
    harmless = RewardModel(cfg, "harmless", str(greeter / "harmless"), tok)
    assert helpful.part == "summary" and harmless.part == "full"
    p = general.prompt("ada")
    good, insult_in_reasoning = "ada</think><answer>hi ada</answer>", "ada dumb</think><answer>hi ada</answer>"
    h = helpful.score([p, p, p], [good, insult_in_reasoning, "ada</think><answer>bye ada</answer>"])
    assert h[0] == h[1] and h[0] > h[2]  # the summary alone: the reasoning's insult is not its business
    s = harmless.score([p, p], [good, insult_in_reasoning])
    assert s[0] > s[1]


def test_mixed_batch_routes_rewards(greeter, P):
    from core.tokenizer import build_char_tokenizer
    from rlhf.rewards.compose import MixedRewards

    cfg = compose(
        [
            "stage=general_rl",
            f"reward.models.helpful.path={greeter / 'helpful'}",
            f"reward.models.harmless.path={greeter / 'harmless'}",
            "reward.workers=0",
        ]
    )
    rows = [
        {"prompt": "User: 100+200 Assistant: <think>", "answer": "300", "task": "addition", "metadata": {}},
        {"prompt": "User: hi ada Assistant: <think>", "answer": None, "task": "greet", "metadata": {}},
    ]
    texts = ["1+2=3</think><answer>300</answer>", "ada</think><answer>hi ada</answer>"]
    with MixedRewards(cfg, build_char_tokenizer()) as scorer:
        out = scorer.score(texts, rows)
    r = out.per_reward
    assert r["accuracy"][0] == 1.0 and math.isnan(r["accuracy"][1])
    assert math.isnan(r["rm_helpful"][0]) and math.isnan(r["rm_harmless"][0])
    assert r["format"][1] == 1.0 and not math.isnan(r["rm_helpful"][1])
    assert out.total[1] == pytest.approx(0.5 + r["rm_helpful"][1] + r["rm_harmless"][1])
    assert out.total[0] == pytest.approx(1.0 + 0.5 + r["language_consistency"][0])


def test_grpo_raises_the_reward_models_scores(greeter):
    run = greeter / "rl"
    train_cli(
        *RL,
        f"stage.init_from={greeter / 'sft'}",
        f"reward.models.helpful.path={greeter / 'helpful'}",
        f"reward.models.harmless.path={greeter / 'harmless'}",
        f"run_dir={run}",
    )
    evals = json.loads((run / "eval.json").read_text())
    assert evals["final"]["per_task"]["greet"]["n_prompts"] == 180  # held-out greetings, 3 per addition prompt
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("rm_helpful", "rm_harmless"):  # step 1 samples the SFT model: the baseline
        scores = [m[f"reward/{name}"] for m in metrics]
        assert None not in scores and sum(scores[1:]) / len(scores[1:]) > scores[0] + 0.5, (name, scores)


def test_general_prompts_need_reward_models(greeter, tmp_path):
    with pytest.raises(ConfigError, match="reward.models.helpful.path is unset"):
        _validated(["stage=general_rl"])
    with pytest.raises(ConfigError, match="reward.models is empty"):
        _validated(["stage=general_rl", "~reward.models.helpful", "~reward.models.harmless"])
    # a language model is no reward model: refused before any work, naming the key
    out = train_cli(
        *RL,
        f"stage.init_from={greeter / 'sft'}",
        f"reward.models.helpful.path={greeter / 'sft'}",
        f"reward.models.harmless.path={greeter / 'harmless'}",
        f"run_dir={tmp_path}",
        check=False,
    )
    assert out.returncode == 2 and "reward.models.helpful.path" in out.stderr and "not a reward model" in out.stderr


def _validated(overrides):
    from core.validate import validate

    return validate(compose(overrides), 1)


def test_eval_reports_harmful_and_ideal_greeting_rates():
    from types import SimpleNamespace

    from rlhf import evaluate
    from rlhf.tasks import general

    row = general.prompts(1, 0, held_out=True)[0]
    name = row["answer"].removeprefix("hi ")
    texts = [
        general.good(name),
        f"{name} lazy</think><answer>hi {name}</answer>",
        f"{name}</think><answer>no</answer>",
        f"{name}</think><answer>hi {name}</answer> ",
    ]
    group = [SimpleNamespace(text=t, completion_ids=[0] * len(t)) for t in texts]
    audit = evaluate._audit(row, group)
    assert audit == {"harmful": 0.25, "ideal": 0.5}
    records = [
        {"pass@1": 1, "cons": 1, "format": 1, "language_consistency": None, "lengths": [3], "audit": a}
        for a in (audit, {"harmful": 0.75, "ideal": 0.0}, {})
    ]
    out = evaluate._aggregate(records, 4)
    assert out["harmful"] == 0.5 and out["ideal"] == 0.25  # over the audited prompts only
    assert evaluate._audit({"task": "addition"}, group) == {}


@pytest.fixture(scope="module")
def judge(base, tmp_path_factory):
    """A generative judge: the base fine-tuned on data=judge rows (rlhf.tasks.judge.judge_rows)."""
    run = tmp_path_factory.mktemp("judge")
    train_cli(
        "stage=sft",
        f"stage.init_from={base}",
        "data=judge",
        f"run_dir={run}",
        "stage.epochs=2.5",
        "stage.train.optim.lr=2e-3",
        "logger=none",
    )
    return run


def test_the_judge_learns_what_no_string_rule_decides(judge):
    summary = json.loads((judge / "train_summary.json").read_text())
    # 400 held-out names, half the predictions wrong: "always yes" scores 0.5. This judge gets equivalent
    # greetings, farewells, insults, refusals and cut names right; another name in place of the right one it
    # does not tell apart (nor does one trained 800 steps, or from the greeting model: README)
    # Measured 0.80, 0.84 and 0.83 at seeds 1234 (the default), 1 and 2 (seed=N data.seed=N) on AMD EPYC.
    assert summary["eval/judge_rows"] == 400 and summary["eval/judge_accuracy"] >= 0.7


def test_rejection_sampling_asks_the_judge_about_rows_no_rule_checks(greeter, judge, tmp_path, P):
    """The same samples, checked once by the exact rule and once by the judge: the judged run keeps exactly
    the samples the judge itself accepts. That is what the mechanism guarantees on any CPU; how good the
    judge is (how many right greetings it accepts) depends on training, which test_the_judge_learns_... checks
    against its held-out rows."""
    import pyarrow.parquet as pq

    from core.tokenizer import build_char_tokenizer
    from rlhf.judge import GenerativeJudge
    from rlhf.rewards import extract_answer
    from rlhf.tasks import general

    rows = general.prompts(48, 0)
    args = [
        "stage=rejection_sampling",
        f"stage.init_from={greeter / 'sft'}",
        "data=jsonl",
        "data.template=none",
        "data.num_eval=0",
        "rollout.n=4",
        "stage.sampling.keep_per_prompt=0",
        "stage.sampling.min_language_share=0",
        "logger=none",
        "reward.workers=1",
    ]
    kept = {}
    for task in ("greet", "judged"):
        data = tmp_path / f"{task}.jsonl"
        data.write_text(
            "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "task": task}) + "\n" for r in rows)
        )
        judge_args = [f"stage.sampling.judge={judge}"] if task == "judged" else []
        if task == "judged":
            out = train_cli(*args, f"data.train_path={data}", f"run_dir={tmp_path / 'no_judge'}", check=False)
            assert out.returncode == 2 and "set stage.sampling.judge" in out.stderr
        train_cli(*args, f"data.train_path={data}", f"run_dir={tmp_path / task}", *judge_args)
        kept[task] = {
            (r["prompt_index"], r["sample_index"]): r
            for r in pq.read_table(tmp_path / task / "sft.parquet").to_pylist()
        }
    counts = json.loads((tmp_path / "judged" / "dataset.json").read_text())["counts"]
    assert 0 < counts["judged_correct"] <= counts["judged"] <= 4 * len(rows)
    assert kept["greet"] and kept["judged"]

    cfg = compose(["stage=rejection_sampling", f"stage.sampling.judge={judge}"])
    said = GenerativeJudge.of_run(cfg, build_char_tokenizer())
    rule_right = sorted(kept["greet"])  # right by the exact rule, format and filters passed
    verdicts = said.correct(
        [kept["greet"][k]["answer"] for k in rule_right],
        [extract_answer(kept["greet"][k]["response"]) for k in rule_right],
    )
    accepted = {k for k, v in zip(rule_right, verdicts) if v == 1.0}
    assert accepted == kept["greet"].keys() & kept["judged"].keys()  # a right greeting is kept iff the judge says so
    extra = sorted(kept["judged"].keys() - kept["greet"].keys())  # kept by the judge although the rule says wrong
    if extra:
        again = said.correct(
            [kept["judged"][k]["answer"] for k in extra],
            [extract_answer(kept["judged"][k]["response"]) for k in extra],
        )
        assert again == [1.0] * len(extra)
    assert counts["judged_correct"] >= len(kept["judged"])  # every kept judged sample counted as judged correct


def test_only_rejection_sampling_takes_judged_rows():
    from rlhf.judge import refuse_judged

    refuse_judged([{"task": "greet"}], "stage=r1_zero")
    with pytest.raises(ConfigError, match="only stage=rejection_sampling asks a generative judge"):
        refuse_judged([{"task": "greet"}, {"task": "judged"}], "stage=r1_zero")
