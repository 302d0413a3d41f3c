"""One registry helper behind every extension point: each name a config gives one is checked at start-up,
before any model is built, and an unknown one is refused with its config key and the valid names."""

import pytest

from core.compose import compose
from core.errors import ConfigError
from core.registry import Registry
from core.stages import RL_STAGES, STAGES
from rlhf.train import check_names
from tests.conftest import train_cli

BAD_NAMES = [
    ("stage=r1_zero", "data.task=additon", r"data.task='additon': no such task \(close: \['addition'\]\)"),
    ("stage=general_rl", "data.general_task=greeting", r"data.general_task='greeting': no such task.*'greet'"),
    ("stage=r1_zero", "rollout.engine=sglang", r"rollout.engine='sglang': no such rollout engine.*\['hf', 'vllm'\]"),
    ("stage=r1_zero", "+reward.weights.acuracy=1.0", r"reward.weights.acuracy='acuracy': no such reward.*accuracy"),
    ("stage=r1_zero", "stage.rl.advantage=ppo", r"stage.rl.advantage='ppo': no such advantage estimator.*'grpo'"),
    ("stage=r1_zero", "stage.rl.loss=ppo", r"stage.rl.loss='ppo': no such policy loss.*'grpo'"),
    ("stage=r1_zero", "stage.rl.kl=k4", r"stage.rl.kl='k4': no such KL estimator.*\['k1', 'k2', 'k3', 'none'\]"),
    ("stage=r1_zero", "stage.rl.loss_agg=mean", r"stage.rl.loss_agg='mean': no such loss aggregation.*token_mean"),
    ("stage=rejection_sampling", "rollout.engine=sglang", r"rollout.engine='sglang'"),
]


@pytest.mark.parametrize("overrides", BAD_NAMES, ids=[b[1].split("=")[0] for b in BAD_NAMES])
def test_every_extension_name_is_checked_with_its_key_and_the_valid_names(overrides):
    *args, message = overrides
    with pytest.raises(ConfigError, match=message):
        check_names(compose(args))


def test_every_stage_and_preset_passes_the_check():
    for name in STAGES.names():
        check_names(compose([f"stage={name}"]))
    assert set(RL_STAGES) == {n for n, s in STAGES.items() if s.loop == "grpo"} and "r1_zero" in RL_STAGES


def test_a_bad_name_stops_the_cli_before_any_work(tmp_path):
    run = tmp_path / "run"
    out = train_cli("stage=r1_zero", "stage.rl.advantage=ppo", f"run_dir={run}", check=False)
    assert out.returncode == 2 and "stage.rl.advantage='ppo'" in out.stderr and "'rloo'" in out.stderr
    assert not run.exists()  # nothing built, nothing written


def test_registering_a_second_definition_under_a_name_is_refused():
    reg = Registry("widget", "widget.name")

    @reg.register("a")
    def first():
        pass

    reg.register("a", first)  # the same definition again (its module imported under a second name): fine
    with pytest.raises(ValueError, match=r"widget 'a' is already registered by .*first; pick another name"):

        @reg.register("a")
        def second():
            pass

    assert reg.get("a") is first and "a" in reg and reg.names() == ["a"]
