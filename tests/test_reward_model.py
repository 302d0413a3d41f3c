"""The reward_model stage: a scalar-head model started from a language model's body learns held-out
preference pairs (Bradley–Terry), and checkpoints of the two heads are not confused."""

import json

import pytest

from core.compose import compose
from tests.conftest import train_cli


def test_reward_model_ranks_held_out_pairs(base, tmp_path):
    rm = tmp_path / "rm"
    train_cli(
        "stage=reward_model",
        f"stage.init_from={base}",
        "data=preference_harmless",
        f"run_dir={rm}",
        "stage.train.steps=60",
        "data.num_train=1920",
        "data.num_eval=100",
        "logger=none",
    )
    summary = json.loads((rm / "train_summary.json").read_text())
    metrics = [json.loads(x) for x in (rm / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval/pairs"] == 100 and summary["eval/pair_accuracy"] >= 0.9
    assert metrics[-1]["train/loss"] < 0.5 * metrics[0]["train/loss"]  # starts near log 2
    meta = json.loads((rm / "checkpoints" / "step_00000060" / "r1stack.json").read_text())
    assert meta["head"] == "scalar"
    # a reward model is no policy: loading it as one names both kinds
    out = train_cli("stage=sft", f"stage.init_from={rm}", f"run_dir={tmp_path / 'x'}", "logger=none", check=False)
    assert out.returncode == 2 and "holds a 'scalar'-head model" in out.stderr


def test_pairs_are_two_segments_scored_at_their_eos():
    from core.tokenizer import build_char_tokenizer
    from rlhf import reward_model

    cfg = compose(["stage=reward_model", "data=preference_helpful", "data.num_train=4"])
    tok = build_char_tokenizer()
    data = reward_model.packed(cfg, tok)
    rows = reward_model.pairs(cfg, "train")
    for i, r in enumerate(rows):
        c, rj = data["ends"][i].tolist()
        assert data["tokens"][i, c] == data["tokens"][i, rj] == tok.eos_token_id
        assert (
            data["segment_ids"][i, c] == 0 and data["segment_ids"][i, rj] == 1 and data["position_ids"][i, c + 1] == 0
        )
        assert (
            tok.decode(data["tokens"][i, c + 1 : rj + 1].tolist(), skip_special_tokens=True)
            == r["prompt"] + r["rejected"]
        )


def test_preference_pairs_hold_out_names_and_need_a_source(tmp_path):
    from core.data import DataError
    from core.errors import ConfigError
    from rlhf import reward_model
    from rlhf.tasks import general

    train = {r["prompt"] for r in general.preference_pairs("helpful", 300, 0)}
    held = {r["prompt"] for r in general.preference_pairs("helpful", 100, 1, held_out=True)}
    assert not train & held
    assert all(any(w in r["rejected"] for w in general.INSULTS) for r in general.preference_pairs("harmless", 50, 0))
    with pytest.raises(ConfigError, match="stage.data_from=FILE"):
        reward_model.pairs(compose(["stage=reward_model"]), "train")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match="line 1.*'rejected'"):
        reward_model.pairs(compose(["stage=reward_model", f"stage.data_from={bad}"]), "train")
