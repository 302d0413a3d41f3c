import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("R1_NO_PROGRESS", "1")


# `make test` runs two pytest workers (xdist, whole files each). vLLM binds its OpenMP threads to cores, by
# default the same first core in every process: each worker's engines get a core of their own instead.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(_WORKER[2:]) % (os.cpu_count() or 1)))

# Files whose fixtures train models for minutes run first, so that the two workers finish together.
LONGEST_FIRST = (
    "test_general_rl",
    "test_pipeline",
    "test_language_mixing",
    "test_r1_zero",
    "test_sft",
    "test_slurm",
    "test_equivalence",
    "test_on_policy_distill",
    "test_hf_models",
    "test_hf_rl",
    "test_tool_calls",
    "test_bad_inputs",
    "test_hf_bridge",
    "test_convert",
    "test_pretrain",
    "test_fuzz",
    "test_plan",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.nodeid.split("::")[0]).stem, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed with one gloo rank, shared by the in-process megatron tests."""
    import parallel  # noqa: F401  (CPU compatibility layer before megatron)
    from parallel import parallelize

    yield parallelize
    parallelize.shutdown()


@pytest.fixture
def P(single_process):
    """`parallel.parallelize` on a fresh TP1 layout (other tests may have left another one)."""
    from core.compose import compose

    single_process.shutdown_model_parallel()
    single_process.init_distributed(compose([]))
    return single_process


def lm_batch(seed: int = 0, b: int = 4, s: int = 16, vocab: int = 100) -> list[dict]:
    """One micro-batch of random tokens in the layout parallel.parallelize expects."""
    from core.data import random_lm_micro_batch

    return [random_lm_micro_batch(b, s, vocab, torch.Generator().manual_seed(seed))]


def grpo_batch(vocab: int, s: int = 16, ends=(5, 16, 8, 11, 7, 13), prompt: int = 3, seed: int = 0) -> dict:
    """A GRPO batch of len(ends) rows right-padded to `s`: a prompt, then a completion whose last scored
    position is ends[i] - 1, then padding; with old/ref/engine log-probs and advantages."""
    g = torch.Generator().manual_seed(seed)
    n = len(ends)
    tokens = torch.randint(1, vocab, (n, s), generator=g)
    loss_mask = torch.zeros(n, s)
    for r, end in enumerate(ends):
        tokens[r, end + 1 :] = 0
        loss_mask[r, prompt - 1 : end] = 1
    batch = {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(s).expand(n, s),
        "advantages": torch.randn(n, 1, generator=g).expand(n, s).contiguous(),
    }
    for key in ("old_logp", "ref_logp", "engine_logp"):
        batch[key] = -torch.rand(n, s, generator=g)
    return batch


def cli_env(**extra) -> dict:
    """The environment of a subprocess started from a test: the repo importable, one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def skip_outside_ci(reason: str) -> None:
    """Skips on a developer machine that lacks what a test needs; in CI (CI=true) the gap is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def require_module(name: str) -> None:
    """skip_outside_ci unless `name` imports (vLLM: make setup installs it, CI must have it)."""
    try:
        __import__(name)
    except ImportError as e:
        skip_outside_ci(f"{name} does not import: {e}")


# metrics that differ run to run; every other one must repeat exactly
WALL_CLOCK = ("perf/", "sync/seconds", "sync/transfer_s", "sync/load_s", "sync/post_s", "time/")


def assert_time_ledger(rows: list[dict], min_covered: float = 0.95) -> None:
    """Every row's time/ phases (core.ledger) are there and account for ≥ min_covered of its wall time."""
    from core.ledger import PHASES

    for r in rows:
        parts = [r[f"time/{p}_s"] for p in PHASES]
        assert min(parts) >= 0 and r["time/step_s"] > 0, r
        assert sum(parts) == pytest.approx(r["time/covered_frac"] * r["time/step_s"], rel=1e-6)
        assert r["time/covered_frac"] >= min_covered, {k: v for k, v in r.items() if k.startswith("time/")}


def read_metrics(run_dir: Path, drop_wall_clock: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in rows] if drop_wall_clock else rows


def run_worker(cmd: list, timeout: int = 900) -> None:
    """Runs a multi-process test worker from the repo root, one thread per rank; fails with its output."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def module_cli(module: str, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess, as a user runs it; fails the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode:
        pytest.fail(f"{module} {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_cli(*overrides, check: bool = True) -> subprocess.CompletedProcess:
    return module_cli("rlhf.train", *overrides, check=check)


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A 40-step pretrained tiny base (a run dir), shared read-only by every test that starts from one."""
    run = tmp_path_factory.mktemp("base")
    train_cli(
        "stage=pretrain",
        f"run_dir={run}",
        "stage.train.steps=40",
        "data.num_train=3000",
        "data.num_eval=32",
        "logger=none",
    )
    return run


@pytest.fixture(scope="session")
def greeter(base, tmp_path_factory):
    """A base fine-tuned on greetings of which half are unhelpful or harmful (ROOT/sft), and its two reward
    models: ROOT/helpful (reads the summary) and ROOT/harmless (the whole response). Shared read-only."""
    from rlhf.tasks import general

    root = tmp_path_factory.mktemp("general")
    rows = root / "greetings.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in general.sft_rows(512, 0, good_share=0.5)))
    train_cli(
        "stage=sft",
        f"stage.init_from={base}",
        f"stage.data_from={rows}",
        f"run_dir={root / 'sft'}",
        "stage.epochs=30",
        "stage.train.optim.lr=1e-3",
        "logger=none",
    )
    for kind, view in (("helpful", "summary"), ("harmless", "full")):
        train_cli(
            "stage=reward_model",
            f"stage.init_from={root / 'sft'}",
            f"data=preference_{kind}",
            f"stage.view={view}",
            f"run_dir={root / kind}",
            "stage.train.steps=100",
            "data.num_train=3200",
            "logger=none",
        )
    return root
