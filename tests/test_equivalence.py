"""Every parallel layout against the single-process run on the same weights and batch (fp32, gloo).

One reference process and two torchrun launches (world 2 and world 4) run all cases; each test reads
its case's row. What each number means is in tests/dist/equivalence_worker.py.
"""

import json
import sys

import pytest

from tests.conftest import ROOT, run_worker

WORKER = ROOT / "tests" / "dist" / "equivalence_worker.py"
WORLD_2 = [
    "dense_tp2",
    "dense_tp2_to_tp1",
    "dense_pp2",
    "dense_dp2_distopt",
    "dense_resume_distopt",
    "dsv3_tp2_sp",
    "dsv3_pp2",
    "dsv3_ep2",
    "dsv3_tp2_ep2_sp",
    "dsv3_dp2_distopt",
]
WORLD_4 = ["dsv3_tp2_ep2_sp", "dsv3_pp2_ep2_from_tp2_ep2"]
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("equivalence")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port"]
    run_worker([sys.executable, WORKER, "reference", workdir])
    run_worker([*torchrun, "29611", "--nproc-per-node", "2", WORKER, "cases", workdir, *WORLD_2])
    rows = {f"{r['case']}@2": r for r in json.loads((workdir / "results.json").read_text())}
    (workdir / "results.json").unlink()
    run_worker([*torchrun, "29612", "--nproc-per-node", "4", WORKER, "cases", workdir, *WORLD_4])
    rows.update({f"{r['case']}@4": r for r in json.loads((workdir / "results.json").read_text())})
    return rows


CASES = [f"{c}@2" for c in WORLD_2] + [f"{c}@4" for c in WORLD_4]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_matches_single_process(results, case):
    row = results[case]
    diffs = {k: v for k, v in row.items() if k.endswith("diff")}
    assert "logits_max_diff" in diffs
    if not case.split("@")[0].endswith(("to_tp1", "from_tp2_ep2")):
        # loss, and the weights after two Adam steps, are compared for every training case
        assert {"loss_diff", "two_steps_max_diff"} <= diffs.keys()
    if case.split("@")[0] in ("dense_tp2", "dense_pp2", "dsv3_tp2_sp"):  # GRPO in trimmed micro-batches
        assert {"grpo_logp_diff", "grpo_loss_diff", "grpo_grads_max_diff"} <= diffs.keys()
    if case.split("@")[0] == "dense_dp2_distopt":  # the RL loss's (sum, count) reduced over two replicas
        assert {"grpo_logp_diff", "grpo_loss_diff"} <= diffs.keys()
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"{case} {row['layout']}: differences above {TOL}: {bad}"


@pytest.mark.slow
def test_layouts_really_differ(results):
    # Guards against a harness bug that would run every case at TP1.
    layouts = {case: tuple(results[case]["layout"].values()) for case in results}
    assert layouts["dense_tp2@2"] == (2, 1, 1, 1)
    assert layouts["dense_pp2@2"] == (1, 2, 1, 1)
    assert layouts["dsv3_ep2@2"] == (1, 1, 2, 2)
    assert layouts["dsv3_tp2_ep2_sp@4"] == (2, 1, 2, 2)
    assert layouts["dsv3_pp2_ep2_from_tp2_ep2@4"] == (1, 2, 2, 2)


@pytest.mark.slow
def test_resume_from_distributed_optimizer_checkpoint(results):
    row = results["dense_resume_distopt@2"]
    assert row["resumed_step"] == 1
    assert row["two_steps_max_diff"] <= TOL
