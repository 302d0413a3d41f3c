"""rlhf.pipeline and the stages it chains that have no test elsewhere (cold_start_sft, distill, tools.eval):
a small chain runs end to end, records lineage, skips finished stages, refuses changed inputs, and
every stage's held-out numbers land in summary.json."""

import json
import shutil

import pytest
import yaml

from core.compose import compose
from core.errors import ConfigError
from tests.conftest import module_cli

SMOKE = [  # the r1_tiny chain's wiring at test size; `memorise` stands in for a long pretrain
    {
        "name": "memorise",
        "args": [
            "stage=sft",
            "stage.init_from=BASE",
            "data.num_train=32",
            "stage.epochs=150",  # 150 steps of the 32 rows: each step sees each row once
            "stage.train.optim.lr=3e-3",
            "stage.train.micro_batch_size=32",
            "stage.train.global_batch_size=32",
        ],
    },
    {
        "name": "r1_zero",
        "args": [
            "stage=r1_zero",
            "stage.init_from=@memorise",
            "stage.train.steps=2",
            "stage.rl.prompts_per_step=8",
            "stage.train.global_batch_size=64",
        ],
        "evaluate": True,
    },
    # from the memorising model, not the base, so that rejection sampling after it finds correct samples
    {
        "name": "cold_start_sft",
        "args": [
            "stage=cold_start_sft",
            "stage.init_from=@memorise",
            "stage.cold_start.source=@r1_zero",
            "stage.epochs=20",
        ],
        "evaluate": True,
    },
    {"name": "rejection_sampling", "args": ["stage=rejection_sampling", "stage.init_from=@cold_start_sft"]},
    {"name": "student_base", "args": ["stage=pretrain", "model=tiny_student", "stage.train.steps=20"]},
    {
        "name": "distill",
        "args": [
            "stage=distill",
            "model=tiny_student",
            "stage.init_from=@student_base",
            "stage.data_from=@rejection_sampling",
            "stage.epochs=20",
        ],
        "evaluate": True,
    },
]
COMMON = ["logger=none", "data.num_train=32", "data.num_eval=8", "eval.k=2", "reward.workers=1"]


def pipeline(*args, check=True):
    return module_cli("rlhf.pipeline", *args, check=check, timeout=900)


@pytest.fixture(scope="module")
def chain(base, tmp_path_factory):
    """The smoke chain run in two calls: up to r1_zero, then the rest (the first stages skipped)."""
    root = tmp_path_factory.mktemp("pipeline")
    preset = root / "smoke.yaml"
    stages = [{**s, "args": [a.replace("BASE", str(base)) for a in s["args"]]} for s in SMOKE]
    preset.write_text(yaml.safe_dump({"stages": stages}))
    run = root / "run"
    first = pipeline(f"pipeline={preset}", f"run_dir={run}", "until=r1_zero", *COMMON)
    assert not (run / "cold_start_sft").exists()
    second = pipeline(f"pipeline={preset}", f"run_dir={run}", *COMMON)
    return preset, run, first, second


def test_the_chain_records_lineage_and_skips_finished_stages(chain):
    preset, run, first, second = chain
    lineage = json.loads((run / "lineage.json").read_text())["stages"]
    assert list(lineage) == [s["name"] for s in SMOKE] and all(s["status"] == "done" for s in lineage.values())
    assert "memorise: done earlier, skipped" in second.stdout and "r1_zero: done earlier, skipped" in second.stdout
    # each input is the exact artifact its producer recorded
    assert (
        lineage["distill"]["inputs"]["rejection_sampling"]["sha256"]
        == lineage["rejection_sampling"]["output"]["sha256"]
    )
    assert lineage["cold_start_sft"]["inputs"]["r1_zero"]["sha256"] == lineage["r1_zero"]["output"]["sha256"]
    assert lineage["distill"]["config_sha256"] and lineage["distill"]["commit"]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"r1_zero", "cold_start_sft", "distill"}
    for name, row in summary.items():
        held = json.loads((run / name / "heldout" / "eval.json").read_text())
        assert row["pass@1"] == held["pass@1"] and 0 <= row["pass@1"] <= 1
        # reported where the reasoning has words to judge (addition's has none: rlhf.rewards.language)
        assert row.get("language_consistency") == held.get("language_consistency")
    assert json.loads((run / "distill" / "heldout" / "eval.json").read_text())["model_preset"] == "tiny_student"
    third = pipeline(f"pipeline={preset}", f"run_dir={run}", *COMMON)  # nothing left to do
    assert third.stdout.count("done earlier, skipped") == len(SMOKE)


def test_cold_start_data_is_verified_and_in_the_r1_pattern(chain):
    import pyarrow.parquet as pq

    from rlhf.tasks import addition

    _, run, _, _ = chain
    data = run / "cold_start_sft" / "cold_start_data"
    rows = pq.read_table(data / "sft.parquet").to_pylist()
    manifest = json.loads((data / "dataset.json").read_text())
    assert rows and manifest["source"]["checkpoint"].startswith(str(run / "r1_zero"))
    assert all(r["source"] == "cold_start" and addition.score(r["response"], r["answer"]) == 1.0 for r in rows)
    assert all(r["response"].count("</think>") == 1 and r["response"].endswith("</answer>") for r in rows)
    # the SFT stage trained on exactly those rows: one packed row per sample at this length, 20 epochs
    metrics = (run / "cold_start_sft" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == -(-20 * len(rows) // 64)


def test_changed_inputs_and_arguments_are_refused(chain):
    """Other arguments for a finished stage are refused; deleting it (what the message says) runs it again with
    them; a stage whose input was re-made since (distill reads student_base) is refused in turn, and so is one
    whose input changed behind the lineage's back. Re-run on student_base, the chain's cheapest stage (a
    3-step pretrain, no evaluation)."""
    preset, run, _, _ = chain
    changed = "student_base:stage.train.steps=3"
    out = pipeline(f"pipeline={preset}", f"run_dir={run}", *COMMON, changed, check=False)
    assert out.returncode == 2 and "stage student_base finished earlier with other arguments" in out.stderr
    shutil.rmtree(run / "student_base")
    again = pipeline(f"pipeline={preset}", f"run_dir={run}", *COMMON, changed, "until=student_base")
    assert "student_base: done earlier" not in again.stdout and "stage.train.steps=3" in again.stdout
    assert json.loads((run / "lineage.json").read_text())["stages"]["student_base"]["argv"][-1] == "stage.train.steps=3"
    out = pipeline(f"pipeline={preset}", f"run_dir={run}", *COMMON, changed, check=False)
    assert out.returncode == 2 and "stage distill finished earlier with other arguments or inputs" in out.stderr
    dataset = run / "rejection_sampling" / "dataset.json"  # an artifact changed behind the lineage's back
    original = dataset.read_text()
    dataset.write_text(original + "\n")
    try:
        out = pipeline(f"pipeline={preset}", f"run_dir={run}", *COMMON, changed, check=False)
        assert out.returncode == 2 and f"needs {dataset}, which changed" in out.stderr
    finally:
        dataset.write_text(original)


def test_a_stage_whose_config_changed_is_not_skipped(tmp_path):
    """The same arguments composing to another config (an edited conf/ preset) stop the pipeline."""
    from rlhf import pipeline as pl

    stages, argv = [{"name": "a", "args": ["stage=pretrain"]}], ["stage=pretrain"]
    (tmp_path / "a").mkdir()

    def finished_with(recorded_argv):
        done = {"status": "done", "argv": argv, "inputs": {}, "config_digest": pl.config_digest(recorded_argv, "a")}
        (tmp_path / "lineage.json").write_text(json.dumps({"pipeline": "t", "stages": {"a": done}}))

    finished_with(argv)
    pl.run(stages, tmp_path, "t", [], {}, None)  # unchanged: skipped, nothing runs
    finished_with([*argv, "model=tiny_student"])  # as if conf/stage/pretrain.yaml had named that model
    with pytest.raises(pl.PipelineError, match="stage a finished earlier with another config"):
        pl.run(stages, tmp_path, "t", [], {}, None)


def test_bad_presets_and_arguments_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "args": ["stage=sft", "stage.init_from=@b"]}]}))
    cases = [
        ([f"pipeline={bad}", f"run_dir={tmp_path}"], "uses @b, which is not an earlier stage"),
        (["pipeline=nope", f"run_dir={tmp_path}"], "no pipeline preset 'nope'"),
        (["pipeline=r1_tiny"], "run_dir= is missing"),
        (["pipeline=r1_tiny", f"run_dir={tmp_path}", "nosuch:x=1"], "no stage ['nosuch']"),
    ]
    for args, message in cases:
        out = pipeline(*args, check=False)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_eval_names_a_missing_checkpoint(tmp_path):
    out = module_cli("tools.eval", f"model={tmp_path}/nothing", f"run_dir={tmp_path}", check=False)
    assert out.returncode == 2 and f"no checkpoint at {tmp_path}/nothing" in out.stderr


def test_the_r1_pattern_tokens_are_configurable():
    from rlhf.cold_start import check_pattern, in_pattern

    # on a command line, Hydra needs the braces quoted: 'stage.cold_start.summary="So the sum is {answer}."'
    c = compose(
        [
            "stage=cold_start_sft",
            "stage.cold_start.reasoning_end='|special_token|'",
            "stage.cold_start.summary='So the sum is {answer}.'",
        ]
    ).stage.cold_start
    row = {"response": "5+7+0=12</think><answer>12</answer>", "prompt": "p"}
    assert in_pattern(row, c)["response"] == "5+7+0=12|special_token|So the sum is 12."
    c.summary = "{answr}"
    with pytest.raises(ConfigError, match="stage.cold_start.summary"):
        check_pattern(c)


def test_r1_tiny_preset_wires_every_stage_to_an_earlier_one():
    from rlhf.pipeline import load_preset

    stages = load_preset("r1_tiny")
    names = [s["name"] for s in stages]
    assert names[:2] == ["pretrain", "r1_zero"] and {"cold_start_sft", "reasoning_rl", "distill", "student_rl"} <= set(
        names
    )
    for s in stages:  # every override composes: a typo in the preset fails here, not 15 minutes in
        compose([a for a in s["args"] if "=@" not in a])
