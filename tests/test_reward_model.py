"""The reward_model stage's data and checkpoints: pairs packed as two segments scored at their eos, held-out
names, checkpoints of the two heads not confused. That a trained reward model ranks held-out pairs is checked
on the session's reward models (tests/conftest.py greeter) in test_general_rl.py."""

import json

import pytest

from core.compose import compose


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
