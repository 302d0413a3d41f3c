"""tools.plan: every 671B preset fits and divides, the published comparisons stay within the README's ±20%,
bad layouts exit non-zero naming the field, and the memory model scales the way the layout says."""

import json
import subprocess
import sys

import pytest

from core.compose import CONF_DIR, compose
from core.errors import ConfigError
from core.validate import pipeline_layers
from parallel.policy import runtime_config
from tests.conftest import ROOT
from tools.plan import PlanError, plan
from tools.plan.published import RUNS, TARGET, compare, constants, fit

PRESETS_671B = sorted(p.stem for p in (CONF_DIR / "parallel").glob("dsv3_*.yaml"))


def planned(*overrides):
    return plan(compose(["model=deepseek_v3_671b", *overrides]))


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tools.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_the_published_layouts_are_presets():
    assert {
        "dsv3_pretrain_2048_h800",
        "dsv3_grpo_verl_96_h20",
        "dsv3_grpo_nemorl_256_h100",
        "dsv3_grpo_nemorl_512_h100",
        "dsv3_grpo_nemorl_v06_256_h100",
        "dsv3_grpo_nemorl_v06_512_h100",
        "dsv3_grpo_nemorl_v06_512_h100_1off",
    } <= set(PRESETS_671B)


@pytest.mark.parametrize("preset", PRESETS_671B)
def test_every_671b_preset_fits_and_divides(preset):
    cfg = compose(["model=deepseek_v3_671b", f"parallel={preset}"])
    out = plan(cfg)
    mem, lay, cl = out["memory_gib"], out["layout"], out["cluster"]
    assert mem["fits"] and 0 < mem["peak"] <= mem["capacity"]
    assert lay["tensor"] * lay["pipeline"] * lay["context"] * lay["data"] == cl["training_gpus"]
    assert cl["training_gpus"] % (lay["pipeline"] * lay["expert"] * lay["expert_tensor"]) == 0
    assert sum(lay["layers_per_stage"]) == 61 and len(lay["layers_per_stage"]) == lay["pipeline"]
    assert 256 % lay["expert"] == 0 and 128 % lay["tensor"] == 0
    assert out["time_s"]["step"] > 0 and out["throughput"]["tokens_per_s_per_gpu"] > 0


@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r.preset}:{r.metric}")
def test_published_figures_within_target(run):
    row = run.run()
    assert abs(row["error"]) <= TARGET, row
    assert row["source"].startswith("https://")


def test_validate_cli_is_the_readme_table():
    proc = cli("--validate")
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    assert table == compare() and table["max_abs_error"] <= TARGET
    assert {r["preset"] for r in table["rows"]} <= set(PRESETS_671B)


@pytest.mark.slow
def test_fitted_constants_are_what_the_fit_returns():
    from tools.plan import hardware as hw

    got = fit()
    assert got["MATMUL_EFF"] == pytest.approx(hw.MATMUL_EFF, abs=0.005)
    assert got["DECODE_OVERHEAD_S"] == pytest.approx(hw.DECODE_OVERHEAD_S, rel=0.02)


def test_cli_prints_json_with_every_term(tmp_path):
    out_file = tmp_path / "plan.json"
    proc = cli(
        "model=deepseek_v3_671b",
        "parallel=dsv3_grpo_verl_96_h20",
        "cluster.gpus=96",
        "cluster.gpu=h20",
        "--out",
        str(out_file),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert json.loads(out_file.read_text()) == out
    memory_keys = {
        "weights",
        "grads",
        "optimizer",
        "activations",
        "rollout_weights",
        "rollout_kv_cache",
        "peak",
        "capacity",
        "fits",
    }
    assert memory_keys <= set(out["memory_gib"])
    assert {"step", "generation", "logprobs", "train", "refit", "offload"} <= set(out["time_s"])
    assert {"matmul", "attention", "tp_comm", "ep_comm", "pp_bubble", "pp_p2p", "dp_sync", "optimizer"} <= set(
        out["time_s"]["update"]
    )
    assert out["time_s"]["update"]["tp_comm"] > 0 and out["time_s"]["update"]["ep_comm"] > 0
    assert out["memory_gib"]["optimizer_on_cpu"] > 0 and out["memory_gib"]["optimizer"] == 0  # CPU Adam
    assert out["cluster"]["spec"]["bf16_flops"] == 148e12


def test_cli_rejects_with_the_field_and_exit_2():
    proc = cli("model=deepseek_v3_671b", "parallel=dsv3_grpo_verl_96_h20", "cluster.gpus=100")
    assert proc.returncode == 2 and not proc.stdout
    assert "world size 100 is not a multiple of tensor×pipeline×context = 8×12×1" in proc.stderr
    assert "Fix:" in proc.stderr


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["parallel=dsv3_grpo_verl_96_h20", "parallel.num_layers_in_last_pipeline_stage=5"],
            r"num_layers_in_last_pipeline_stage=5 leaves 56 layers for 11 middle pipeline stages.*Fix: .*\(6, 5\)",
        ),
        (
            [
                "parallel=dsv3_grpo_nemorl_256_h100",
                "parallel.num_layers_in_first_pipeline_stage=null",
                "parallel.num_layers_in_last_pipeline_stage=null",
            ],
            r"num_layers=61 is not divisible by parallel.pipeline=16",
        ),
        (
            ["parallel=dsv3_grpo_nemorl_256_h100", "parallel.expert=48"],
            r"parallel.expert=48 does not divide model.num_moe_experts=256",
        ),
        (
            ["parallel=dsv3_grpo_verl_96_h20", "parallel.tensor=3"],
            r"parallel.tensor=3 does not divide model.num_attention_heads=128",
        ),
        (["parallel=dsv3_grpo_verl_96_h20", "plan.rollout_tensor=48"], r"plan.rollout_tensor=48 must divide"),
        (["parallel=dsv3_grpo_nemorl_512_h100", "plan.rollout_gpus=512"], r"plan.rollout_gpus in \[1, 511\]"),
        (
            ["parallel=dsv3_pretrain_2048_h800", "cluster.gpu=a100"],
            r"cluster.gpu='a100'.*\['h100', 'h20', 'h200', 'h800'\]",
        ),
        (["cluster.gpu=h100"], r"cluster.gpus is not set"),
        (
            [
                "parallel=dsv3_pretrain_2048_h800",
                "parallel.pipeline=15",
                "parallel.num_layers_in_last_pipeline_stage=null",
                "parallel.num_layers_in_first_pipeline_stage=5",
                "cluster.gpus=1920",
            ],
            r"dualpipe needs an even parallel.pipeline",
        ),
        (["parallel=dsv3_grpo_nemorl_256_h100", "plan.response_tokens=2000"], r"plan.response_tokens=2000 .* exceeds"),
    ],
)
def test_layouts_that_do_not_divide_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        planned(*overrides)


def test_671b_on_8_gpus_does_not_fit():
    need = r"training .* needs \d+\.\d+ GiB per GPU but cluster.gpu=h200 has 138.0 GiB.*Fix: .*parallel.expert"
    with pytest.raises(PlanError, match=need):
        planned("parallel.expert=8", "cluster.gpus=8", "cluster.gpu=h200", "stage.train.micro_batch_size=8")


def test_too_little_memory_suggests_recompute():
    with pytest.raises(PlanError, match=r"largest: activations .*Fix: parallel.recompute=selective"):
        planned("parallel=dsv3_pretrain_2048_h800", "parallel.recompute=none")


def test_vllm_that_cannot_hold_its_weights_is_rejected():
    with pytest.raises(PlanError, match=r"generation \(vLLM weights.*Fix: raise plan.rollout_tensor"):
        planned("parallel=dsv3_grpo_nemorl_256_h100", "plan.rollout_tensor=8")


def test_doubling_tp_halves_weights_per_gpu():
    def mem(tp):
        overrides = [
            "model=llama3_1_8b",
            f"parallel.tensor={tp}",
            "cluster.gpus=8",
            "cluster.gpu=h100",
            "stage.train.micro_batch_size=1",
            "stage.train.global_batch_size=8",
        ]
        return plan(compose(overrides))["memory_gib"]

    m2, m4 = mem(2), mem(4)
    for k in ("weights", "grads"):
        assert m4[k] / m2[k] == pytest.approx(0.5, abs=0.03)
    assert m4["activations"] < m2["activations"]


def test_layout_knobs_move_memory_the_right_way():
    base = planned("parallel=dsv3_grpo_nemorl_256_h100")["memory_gib"]
    more_ep = planned("parallel=dsv3_grpo_nemorl_256_h100", "parallel.expert=32", "cluster.gpus=512")["memory_gib"]
    no_recompute = planned("parallel=dsv3_grpo_nemorl_256_h100", "parallel.recompute=selective")["memory_gib"]
    no_distopt = planned("parallel=dsv3_grpo_nemorl_256_h100", "parallel.distributed_optimizer=false")
    no_distopt = no_distopt["memory_gib"]
    assert more_ep["weights"] < 0.7 * base["weights"]  # experts are 3/4 of the stage's weights
    assert no_recompute["activations"] > 5 * base["activations"]
    assert no_distopt["optimizer"] > 1.2 * base["optimizer"]  # the dense state no longer split over DP 16
    assert base["rollout_weights"] == pytest.approx(671e9 * 2 / 32 / 2**30, rel=0.01)  # bf16 over vLLM TP32


def test_step_time_terms_follow_the_layout():
    t = planned("parallel=dsv3_pretrain_2048_h800")["time_s"]
    assert t["tp_comm"] == 0 and t["ep_comm"] > 0 and t["comm_hidden"] > 0  # no TP; DualPipe hides the all-to-all
    assert 0 < t["pp_bubble"] < 0.05 * t["step"]
    assert t["dp_sync"] > 0 and t["dp_sync_exposed"] == 0  # overlapped with the backward
    nemo_sync = planned("parallel=dsv3_grpo_nemorl_256_h100")["time_s"]
    nemo_async = planned("parallel=dsv3_grpo_nemorl_512_h100")["time_s"]
    train_side = ("logprobs", "train", "refit", "offload")
    assert nemo_sync["step"] == pytest.approx(nemo_sync["generation"] + sum(nemo_sync[k] for k in train_side))
    assert nemo_async["step"] == pytest.approx(max(nemo_async["generation"], sum(nemo_async[k] for k in train_side)))
    assert nemo_async["decode_steps"] < nemo_sync["decode_steps"]  # async keeps the engines full: no tail


def test_faster_matmuls_shorten_the_step():
    slow = planned("parallel=dsv3_pretrain_2048_h800")["time_s"]["step"]
    with constants(MATMUL_EFF=0.72):
        fast = planned("parallel=dsv3_pretrain_2048_h800")["time_s"]["step"]
    assert fast == pytest.approx(slow / 2, rel=0.1)


def test_uneven_pipeline_split_matches_megatron():
    p = compose(["model=deepseek_v3_671b", "parallel=dsv3_grpo_nemorl_256_h100"]).parallel
    assert pipeline_layers(61, p) == [3] + [4] * 14 + [2]
    p = compose(["model=deepseek_v3_671b", "parallel=dsv3_grpo_verl_96_h20"]).parallel
    assert pipeline_layers(61, p) == [5] * 11 + [6]


def test_uneven_split_reaches_megatron():
    import parallel  # noqa: F401  (CPU compatibility layer before megatron)
    from core.model import transformer_config

    cfg = compose(["model=deepseek_v3_671b", "parallel=dsv3_grpo_nemorl_256_h100"])
    config = transformer_config(cfg.model, **runtime_config(cfg))
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (3, 2)
    tiny = transformer_config(compose([]).model, **runtime_config(compose([])))
    assert tiny.num_layers_in_first_pipeline_stage is None and tiny.num_layers_in_last_pipeline_stage is None
