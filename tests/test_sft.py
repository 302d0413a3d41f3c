"""The sft and rejection_sampling stages: fine-tuning a base on prompt/response rows (loss on the response
only, packed, steps from epochs), sampling a model into a filtered, versioned dataset with provenance, and
that dataset feeding sft; clear errors for missing inputs."""

import json

import pytest

from core.compose import compose
from core.data import DataError
from core.errors import ConfigError
from rlhf.tasks import addition
from tests.conftest import train_cli as _train


def test_sft_teaches_the_base_the_traces_it_is_shown(base, tmp_path):
    tuned = tmp_path / "sft"
    rows = addition.sft_rows(600)
    data = tmp_path / "rs"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train(
        "stage=sft",
        f"stage.init_from={base}",
        f"stage.data_from={data}",
        f"run_dir={tuned}",
        "stage.epochs=2",
        "stage.train.micro_batch_size=32",
        "data.num_eval=32",
        "logger=none",
    )
    metrics = [json.loads(x) for x in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 19  # ceil(2 epochs × 600 rows (one sample a row at this length) / 64)
    assert metrics[-1]["train/loss"] < 0.85 * metrics[0]["train/loss"]
    before = json.loads((base / "train_summary.json").read_text())
    after = json.loads((tuned / "train_summary.json").read_text())
    # A 40-step base answers bare; after SFT it opens every greedy answer with a trace (right or not).
    assert after["eval/reasoning_first_greedy"] >= 0.9 > 0.1 >= before["eval/reasoning_first_greedy"]


def test_the_loss_covers_the_response_and_eos_only():
    from core.tokenizer import build_char_tokenizer
    from rlhf import sft

    cfg = compose(["stage=sft", "stage.init_from=x", "data.num_train=8"])
    tok = build_char_tokenizer()
    data = sft.packed(cfg, tok)
    rows = sft.rows(cfg)
    response_tokens = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert int(data["loss_mask"].sum()) == response_tokens
    assert cfg.stage.train.steps == 1  # ceil(2 epochs × 8 rows / 64)


def test_missing_inputs_are_named(tmp_path):
    from rlhf import sft

    with pytest.raises(DataError, match="a directory without sft.parquet or sft.jsonl"):
        sft.rows(compose(["stage=sft", f"stage.data_from={tmp_path}"]))
    with pytest.raises(ConfigError, match="stage.data_from"):
        sft.rows(compose(["stage=sft", "data=countdown"]))
    out = _train("stage=sft", f"run_dir={tmp_path / 'run'}", "logger=none", check=False)
    assert out.returncode == 2 and "set stage.init_from" in out.stderr


@pytest.fixture(scope="module")
def memorised(base, tmp_path_factory):
    """A model that has memorised 32 prompts' traces, so that sampling it yields correct answers."""
    run = tmp_path_factory.mktemp("memorised")
    _train(
        "stage=sft",
        f"stage.init_from={base}",
        f"run_dir={run}",
        "data.num_train=32",
        "stage.epochs=300",
        "stage.train.optim.lr=3e-3",
        "stage.train.micro_batch_size=32",
        "data.num_eval=4",
        "logger=none",
    )
    return run


def test_rejection_sampling_keeps_verified_clean_samples_and_feeds_sft(base, memorised, tmp_path):
    import pyarrow.parquet as pq

    rs = tmp_path / "rs"
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(json.dumps({"prompt": f"User: hi {i} Assistant:", "response": " hello"}) + "\n" for i in range(40))
    )
    args = [
        "stage=rejection_sampling",
        f"stage.init_from={memorised}",
        f"run_dir={rs}",
        "data.num_train=32",
        "rollout.n=8",
        f"stage.sampling.non_reasoning_path={chat}",
        "logger=none",
        "reward.workers=1",
    ]
    _train(*args)
    manifest = json.loads((rs / "dataset.json").read_text())
    counts = manifest["counts"]
    assert counts["samples"] == 256 and counts["kept"] >= 8
    assert sum(v for k, v in counts.items() if k not in ("prompts", "samples")) == counts["samples"]
    table = pq.read_table(rs / "sft.parquet")
    assert table.schema.metadata[b"r1stack_version"].decode() == manifest["version"]
    rows = table.to_pylist()
    reasoning = [r for r in rows if r["source"] == "rejection_sampling"]
    assert len(reasoning) == counts["kept"] and len({r["prompt_index"] for r in reasoning}) == len(
        reasoning
    )  # 1 a prompt
    assert all(addition.score(r["response"], r["answer"]) == 1.0 for r in reasoning)
    assert manifest["non_reasoning"] == round(counts["kept"] / 3) == len(rows) - len(reasoning)  # share 0.25
    assert manifest["source"]["checkpoint"].endswith("step_00000150")
    again = _train(*args)  # a finished run is not redone
    assert "already done" in again.stdout + again.stderr and json.loads((rs / "dataset.json").read_text()) == manifest

    tuned = tmp_path / "stage3_sft"
    _train(
        "stage=sft",
        f"stage.init_from={base}",
        f"stage.data_from={rs}",
        f"run_dir={tuned}",
        "stage.epochs=1",
        "data.num_eval=4",
        "logger=none",
    )
    assert (tuned / "checkpoints" / "latest").exists()


def test_the_sampled_model_writes_cots_for_non_trivial_non_reasoning_rows(memorised, tmp_path):
    import pyarrow.parquet as pq

    short = [
        {"prompt": f"User: hi {n} Assistant: <think>", "response": f"{n}</think><answer>hi {n}</answer>"}
        for n in ("ada", "bob", "cy", "dan")
    ]  # 31 characters or fewer: trivial
    long = [
        {
            "prompt": f"User: what is {a} plus {b} please Assistant: <think>",
            "response": f"</think><answer>{a + b}</answer>",
        }
        for a, b in ((12, 30), (7, 5), (40, 41), (3, 99))
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in short + long))
    rs = tmp_path / "rs"
    _train(
        "stage=rejection_sampling",
        f"stage.init_from={memorised}",
        f"run_dir={rs}",
        "data.num_train=16",
        "rollout.n=2",
        f"stage.sampling.non_reasoning_path={chat}",
        "stage.sampling.non_reasoning_share=0.5",
        "stage.sampling.non_reasoning_cot=true",
        "stage.train.seq_length=128",
        "logger=none",
        "reward.workers=1",
    )
    manifest = json.loads((rs / "dataset.json").read_text())
    rows = [r for r in pq.read_table(rs / "sft.parquet").to_pylist() if r["source"].startswith("non_reasoning")]
    given = {r["prompt"]: r["response"] for r in short + long}
    cot = manifest["counts"]["cot"]
    picked_long = [r for r in rows if len(r["prompt"]) >= 40]
    assert cot["trivial"] == len(rows) - len(picked_long) and cot["written"] >= 1
    assert cot["written"] + cot["unfinished"] + cot["rejected"] == len(picked_long)
    for r in rows:
        if r["source"] == "non_reasoning_cot":  # the model's reasoning, then the row's own answer
            assert r["response"] != given[r["prompt"]] and r["response"].endswith(given[r["prompt"]])
            assert r["response"].count("</think>") == 1
        else:
            assert r["response"] == given[r["prompt"]]
    assert sum(r["source"] == "non_reasoning_cot" for r in rows) == cot["written"]


def test_cot_rows_must_have_room_for_a_cot():
    from rlhf.non_reasoning import write_cots

    cfg = compose(
        [
            "stage=rejection_sampling",
            "stage.sampling.non_reasoning_cot=true",
            "stage.sampling.non_reasoning_path=chat.jsonl",
        ]
    )
    plain = {
        "prompt": "User: write a poem about the sea Assistant:",
        "response": "waves",
        "source": "non_reasoning",
        "prompt_index": 3,
    }
    with pytest.raises(
        DataError, match="non-reasoning row 3 of chat.jsonl .*no place for a CoT.*non_reasoning_cot=false"
    ):
        write_cots(None, None, [plain], cfg)


def test_rejection_filters():
    from rlhf.rejection_sampling import screen

    s = compose(["stage=rejection_sampling"]).stage.sampling
    ok = {"accuracy": 1.0, "format": 1.0, "language_consistency": 1.0}
    seen: set[str] = set()
    assert screen("add units</think><answer>5</answer>", ok, s, "en", seen) == "keep"
    assert screen("add units</think><answer>5</answer>", ok, s, "en", seen) == "duplicate"
    assert screen("x</think><answer>6</answer>", {**ok, "accuracy": 0.0}, s, "en", set()) == "incorrect"
    assert (
        screen("add the units</think><answer>5</answer>", {**ok, "language_consistency": 0.6}, s, "en", set())
        == "mixed_language"
    )
    wordless = {**ok, "language_consistency": 0.0}  # digits only: no language to judge, not a mixed one
    assert screen("5+7=12</think><answer>12</answer>", wordless, s, "en", set()) == "keep"
    assert screen("a" * 2001 + "</think><answer>5</answer>", ok, s, "en", set()) == "long_paragraph"
    assert screen("```py\nx\n```</think><answer>5</answer>", ok, s, "en", set()) == "code_block"
