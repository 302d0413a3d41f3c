import logging
import os
import random
import signal
import time

import pytest
import rewards_for_tests  # noqa: F401  (registers test_sleep, test_raise, test_length, test_exit)

from core.data import DataError
from core.errors import ConfigError
from rlhf.rewards import REWARDS, RewardPool
from rlhf.tasks import addition, validate_gold

fmt, acc = REWARDS["format"], REWARDS["accuracy"]
ADD = {"prompt": "User: 385+047 Assistant: <think>", "answer": "432", "task": "addition", "metadata": {}}


def math_sample(gold):
    return {"prompt": "p", "answer": gold, "task": "math", "metadata": {}}


@pytest.mark.parametrize(
    "completion",
    [
        "5+7+0=12</think><answer>432</answer>",
        " reasoning </think>\n\n<answer> 432 </answer>\n",
        "a\nmulti-line\nthought</think> <answer>x</answer>   ",
    ],
)
def test_format_accepts_think_then_answer(completion):
    assert fmt(completion, ADD) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "5+7+0=12<answer>432</answer>",  # no </think>
        "5+7+0=12</think>432",  # no answer tags
        "5+7+0=12</think><answer>432",  # unclosed answer
        "r</think><answer>432</answer>x",  # junk after the answer
        "r</think>so<answer>432</answer>",  # text between the blocks
        "</think><answer>432</answer>",  # empty think
        "  \n </think><answer>432</answer>",  # whitespace-only think
        "r</think><answer> </answer>",  # empty answer
        "<think>r</think><answer>432</answer>",  # a second <think>
        "r</think><answer>1</answer><answer>2</answer>",  # two answers
        "r</think></think><answer>432</answer>",  # two </think>
        "<answer>432</answer>r</think>",  # answer inside think, wrong order
    ],
)
def test_format_rejects(completion):
    assert fmt(completion, ADD) == 0.0


def test_addition_accuracy_matches_the_pretraining_scorer():
    rng = random.Random(0)
    seen = set()
    for a, b in addition.sample_pairs(rng, 200):
        for kind in addition.MIX:
            c = addition.completion(rng, a, b, kind)
            sample = {**ADD, "answer": addition.gold(a, b)}
            assert acc(c, sample) == addition.score(c, sample["answer"]), c
            seen.add(acc(c, sample))
    assert seen == {0.0, 1.0}
    assert acc("x</think><answer> 432</answer>", ADD) == 0.0  # exact match, as addition.score


@pytest.mark.parametrize(
    "gold, pred, want",
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("1/2", "$\\frac12$", 1.0),
        ("2", "3", 0.0),
        ("2", " 2 ", 1.0),
        ("x^2+1", "1+x^2", 1.0),
        ("$\\sqrt{2}$", "\\boxed{\\sqrt 2}", 1.0),
        ("10", "???", 0.0),  # unparsable prediction
        ("10", "", 0.0),
        # a relation is not a value: math-verify alone compares its right side (or an approximation's left)
        ("7", "1+1=7", 0.0),
        ("7", "5=7", 0.0),
        ("7", "7 \\approx 5", 0.0),
        ("7", "a+b=7", 0.0),
        ("7", "x=7", 1.0),  # symbol = value stands for the value
        ("7", "$x = 3+4$", 1.0),
        ("x=7", "x=7", 1.0),  # a relation as the gold is compared as one
        ("\\approx 3.14", "3.14", 1.0),
    ],
)
def test_math_accuracy_uses_math_verify(gold, pred, want):
    assert acc(f"r</think><answer>{pred}</answer>", math_sample(gold)) == want


def test_only_an_answer_after_the_reasoning_earns_accuracy():
    """An <answer> block inside the reasoning (before </think>) or with no </think> at all earns nothing,
    and, being the first block, leaves none after it to count either. Format stays a reward of its own."""
    assert acc("guess <answer>432</answer> then </think><answer>1</answer>", ADD) == 0.0
    assert acc("guess <answer>1</answer> then </think><answer>432</answer>", ADD) == 0.0
    assert acc("guess then </think><answer>432</answer>", ADD) == 1.0
    assert acc("<answer></think></answer><answer>432</answer>", ADD) == 0.0  # opened inside the reasoning
    assert acc("5+7+0=12<answer>432</answer>", ADD) == 0.0  # no </think>: the pretraining's broken form
    assert acc("r<answer>2</answer>", math_sample("2")) == 0.0
    assert addition.score("5+7+0=12<answer>432</answer>", "432") == 0.0
    assert fmt("guess <answer>432</answer> then </think><answer>1</answer>", ADD) == 0.0


def test_accuracy_without_answer_tags_is_zero():
    assert acc("r</think> 0.5", math_sample("0.5")) == 0.0
    # the first answer counts
    assert acc("r</think><answer>3</answer><answer>2</answer>", math_sample("2")) == 0.0


def test_format_gated_accuracy_needs_both():
    gated = REWARDS["format_gated_accuracy"]
    assert gated("r</think><answer>432</answer>", ADD) == 1.0
    assert gated("</think><answer>432</answer>", ADD) == 0.0  # right answer, empty think
    assert gated("r</think><answer>431</answer>", ADD) == 0.0


def test_reasoning_gym_countdown_is_scored_zero_or_one():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("countdown", size=1, seed=3)[0]
    sample = {"prompt": "p", "answer": entry["answer"], "task": "rg/countdown", "metadata": {"entry": entry}}
    assert acc(f"r</think><answer>{entry['answer']}</answer>", sample) == 1.0
    wrong = "+".join(map(str, entry["metadata"]["numbers"]))  # uses the numbers; rg alone gives 0.05
    assert entry["metadata"]["target"] != sum(entry["metadata"]["numbers"])
    assert acc(f"r</think><answer>{wrong}</answer>", sample) == 0.0
    assert acc("r</think><answer>no idea</answer>", sample) == 0.0


def test_validate_gold_names_the_line_and_the_fix():
    rows = [
        {**math_sample("\\frac{1}{2}"), "_where": "data.jsonl line 1"},
        {**math_sample("\\frac{1}{2"), "_where": "data.jsonl line 3"},
    ]
    with pytest.raises(DataError, match=r"data.jsonl line 3: math-verify cannot parse .*Fix:"):
        validate_gold(rows)
    with pytest.raises(DataError, match=r"train row 1: .*'answer'"):
        validate_gold([math_sample("1"), math_sample("???")], where="train")
    with pytest.raises(DataError, match=r"row 0: unknown task 'physics'"):
        validate_gold([{**math_sample("1"), "task": "physics"}])
    with pytest.raises(DataError, match=r"metadata.entry"):
        validate_gold([{**math_sample("1"), "task": "rg/countdown"}])
    validate_gold([math_sample("x^2+1"), ADD])  # fine rows pass


def test_unknown_reward_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"reward.weights .*'accurracy'.*registered: \[.*'accuracy'"):
        RewardPool({"accurracy": 1.0}, timeout_s=1, workers=0)


def test_pool_imports_the_modules_that_define_its_rewards_and_task_scorers():
    pool = RewardPool({"accuracy": 1.0, "test_sleep": 1.0}, timeout_s=1, workers=0, modules=["json"])
    scorers = {"rlhf.tasks.math", "rlhf.rewards.coding", "rlhf.tasks.sort_digits"}  # math, code, sort_digits
    assert scorers <= set(pool.modules)
    assert set(pool.modules) - scorers >= {"rlhf.rewards.rules", rewards_for_tests.__name__, "json"}


def batch():
    comps = ["r</think><answer>432</answer>", "</think><answer>432</answer>", "r</think><answer>0.5</answer>", "junk"]
    samples = [ADD, ADD, math_sample("\\frac{1}{2}"), math_sample("1")]
    return comps, samples


WEIGHTS = {"accuracy": 1.0, "format": 0.5, "test_length": 0.01}


@pytest.fixture(scope="module")
def pool():
    with RewardPool(WEIGHTS | {"test_sleep": 0.0, "test_raise": 0.0, "test_exit": 0.0}, timeout_s=1.0, workers=2) as p:
        yield p


@pytest.mark.parametrize("workers", [0, 2])
def test_weighted_totals(workers, pool):
    comps, samples = batch()
    p = pool if workers else RewardPool(WEIGHTS, timeout_s=5, workers=0)
    out = p.score(comps, samples)
    assert out.per_reward["accuracy"] == [1, 1, 1, 0]
    assert out.per_reward["format"] == [1, 0, 1, 0]
    want = [a + 0.5 * f + 0.01 * len(c) for a, f, c in zip([1, 1, 1, 0], [1, 0, 1, 0], comps)]
    assert out.total == pytest.approx(want) and out.per_reward["test_length"] == [len(c) for c in comps]
    assert not any(out.errors.values()) and not any(out.timeouts.values())


def test_a_task_registered_outside_the_package_is_scored_in_the_workers(pool):
    row = {"prompt": "p", "answer": "abc", "task": "test_upper", "metadata": {}}
    out = pool.score(["r</think><answer>ABC</answer>", "r</think><answer>abc</answer>"], [row, row])
    assert out.per_reward["accuracy"] == [1.0, 0.0] and not any(out.errors.values())


def test_a_raising_reward_scores_zero_and_is_logged_once(pool, caplog):
    comps, samples = batch()
    samples = [{**s, "metadata": {"raise": i % 2 == 0}} for i, s in enumerate(samples)]
    with caplog.at_level(logging.ERROR, logger="rlhf.rewards.pool"):
        out = pool.score(comps, samples)
        pool.score(comps, samples)
    assert out.per_reward["test_raise"] == [0, 1, 0, 1]
    assert out.errors == {**dict.fromkeys(out.errors, 0), "test_raise": 2}
    assert out.per_reward["accuracy"] == [1, 1, 1, 0]  # the others are still computed
    logged = [r for r in caplog.records if "test_raise" in r.getMessage()]
    assert len(logged) == 1 and "boom from test_raise" in logged[0].getMessage()


def test_a_hung_reward_times_out_and_the_pool_recovers(pool):
    comps, samples = batch()
    slow = [{**s, "metadata": {"sleep_s": 60.0 if i == 1 else 0.0}} for i, s in enumerate(samples)]
    start = time.monotonic()
    out = pool.score(comps, slow)
    assert time.monotonic() - start < 1.0 + 4.0
    assert out.per_reward["test_sleep"] == [1, 0, 1, 1]
    assert out.timeouts["test_sleep"] == 1 and out.errors["test_sleep"] == 0
    assert out.per_reward["accuracy"] == [1, 1, 1, 0]
    again = pool.score(comps, samples)  # the hung worker was replaced
    assert again.per_reward["test_sleep"] == [1, 1, 1, 1] and not any(again.timeouts.values())


def test_a_dying_worker_counts_as_an_error_and_is_replaced(pool):
    comps, samples = batch()
    out = pool.score(comps, [{**s, "metadata": {"exit": i == 2}} for i, s in enumerate(samples)])
    assert out.per_reward["test_exit"] == [1, 1, 0, 1] and out.errors["test_exit"] == 1
    assert pool.score(comps, samples).per_reward["test_exit"] == [1, 1, 1, 1]


def test_preemption_signals_leave_the_workers_alone(pool):
    """Slurm sends USR1/TERM to every process of a step; the trainer handles them, the workers must not die."""
    comps, samples = batch()
    pool.score(comps, samples)  # workers (and the forkserver) are up
    pids = [w.proc.pid for w in pool._workers]
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    out = pool.score(comps, samples)
    assert sum(out.errors.values()) == 0 and [w.proc.pid for w in pool._workers] == pids
    assert all(w.proc.is_alive() for w in pool._workers)


def test_inline_counts_a_slow_call_as_a_timeout():
    out = RewardPool({"test_sleep": 1.0}, timeout_s=0.05, workers=0).score(
        ["x", "y"], [{"metadata": {"sleep_s": 0.2}}, {"metadata": {}}]
    )
    assert out.per_reward["test_sleep"] == [0, 1] and out.timeouts == {"test_sleep": 1}


def test_an_unpicklable_sample_is_an_error_not_a_hang(pool):
    comps, samples = batch()
    samples[0] = {**samples[0], "metadata": {"fn": lambda: 0}}
    out = pool.score(comps, samples)
    assert out.per_reward["accuracy"] == [0, 1, 1, 0] and out.errors["accuracy"] == 1


def test_language_consistency_is_the_share_of_target_language_words_in_the_reasoning():
    from rlhf.rewards.language import language_consistency as lc

    en, zh = {"metadata": {"language": "en"}}, {"metadata": {"language": "zh"}}
    assert lc("first add the units, then carry the one</think><answer>5</answer>", en) == 1.0
    assert lc("先把个位相加，然后进位</think><answer>5</answer>", zh) == 1.0
    mixed = lc("first add the units, 然后进位一, then write the answer</think>", en)
    assert 0.5 < mixed < 0.7  # 8 English words of 13 (a Han character is a word)
    assert lc("first add the units, then carry the one</think>", zh) == 0.0
    # Too few words to judge (digits only, empty, two words): 0, never a free 1
    assert lc("5+7=12;8+4+1=13</think><answer>12</answer>", en) == 0.0
    assert lc("two words</think><answer>12</answer>", en) == 0.0
    assert lc("three words here</think>", en) == 1.0
    assert (
        lc("the units first</think><answer>然后进位 然后进位 然后进位</answer>", en) == 1.0
    )  # only the reasoning counts
    assert lc("", {"metadata": {}}) == 0.0
