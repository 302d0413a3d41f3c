"""Config composition and the start-up validation: each bad layout names the field and the fix."""

import pytest

from core.compose import CONF_DIR, compose
from core.errors import ConfigError
from core.validate import validate

PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "hf")  # hf needs a directory


def bad(overrides, world=1, match=None):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides), world)


def test_every_model_preset_composes_and_validates():
    assert {"tiny_dense", "tiny_dsv3", "qwen2_5_1_5b", "qwen2_5_7b", "llama3_1_8b", "deepseek_v3_671b"} <= set(PRESETS)
    for name in PRESETS:
        cfg = validate(compose([f"model={name}"]), 1)
        assert cfg.model.name == name and cfg.parallel.data == 1
        assert cfg.model.padded_vocab_size >= cfg.model.vocab_size


def test_model_hf_without_a_directory_is_refused():
    with pytest.raises(ConfigError, match="model.path"):
        compose(["model=hf"])


def test_published_hyperparameters():
    v3 = compose(["model=deepseek_v3_671b"]).model
    assert (v3.num_layers, v3.hidden_size, v3.num_moe_experts, v3.moe_router_topk) == (61, 7168, 256, 8)
    assert (v3.kv_lora_rank, v3.q_lora_rank, v3.first_k_dense_replace, v3.mtp_num_layers) == (512, 1536, 3, 1)
    qwen = compose(["model=qwen2_5_7b"]).model
    assert (qwen.num_layers, qwen.hidden_size, qwen.num_query_groups, qwen.vocab_size) == (28, 3584, 4, 152064)
    llama = compose(["model=llama3_1_8b"]).model
    assert (llama.num_layers, llama.ffn_hidden_size, llama.rotary_base, llama.llama3_rope_scaling) == (
        32,
        14336,
        500000.0,
        8.0,
    )


def test_valid_layouts_fill_data_parallel():
    cfg = validate(
        compose(
            [
                "model=tiny_dsv3",
                "parallel.tensor=2",
                "parallel.expert=2",
                "parallel.sequence_parallel=true",
                "stage.train.micro_batch_size=4",
            ]
        ),
        4,
    )
    assert cfg.parallel.data == 2


def test_tp_must_divide_heads():
    bad(["parallel.tensor=3"], 3, match=r"parallel.tensor=3 does not divide model.num_attention_heads=4.*\[1, 2, 4\]")


def test_tp_must_divide_kv_heads():
    bad(["parallel.tensor=4"], 4, match=r"num_query_groups=2 \(KV heads\).*Fix")


def test_ep_must_divide_experts():
    bad(["model=tiny_dsv3", "parallel.expert=3"], 3, match=r"parallel.expert=3 does not divide model.num_moe_experts=8")


def test_ep_on_a_dense_model():
    bad(["parallel.expert=2"], 2, match="has no experts")


def test_world_size_must_match_the_layout():
    bad(["parallel.tensor=2"], 3, match=r"world size 3 is not a multiple of tensor×pipeline×context")
    bad(["parallel.data=2"], 4, match=r"world size 4 ≠ tensor×pipeline×context×data.*launch 2 processes")


def test_moe_with_tp_needs_sequence_parallel():
    bad(["model=tiny_dsv3", "parallel.tensor=2"], 2, match=r"sequence_parallel=true")


def test_sequence_parallel_needs_tp():
    bad(["parallel.sequence_parallel=true"], 1, match="needs parallel.tensor > 1")


def test_layers_must_divide_by_pp():
    bad(["parallel.pipeline=3"], 3, match=r"num_layers=4 is not divisible by parallel.pipeline=3.*\[1, 2, 4\]")


def test_batch_must_split_over_data_parallel():
    bad(["stage.train.global_batch_size=100", "stage.train.micro_batch_size=64"], 1, match="global_batch_size=100")


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'parallel.tensr'.*spelling"):
        compose(["parallel.tensr=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.foo'"):
        compose(["+model.foo=1"])


def test_bad_types_and_presets_are_named():
    with pytest.raises(ConfigError, match=r"model.hidden_size"):
        compose(["model.hidden_size=wide"])
    with pytest.raises(ConfigError, match=r"no preset 'nope' in config group 'model'.*tiny_dense"):
        compose(["model=nope"])


def test_every_dataclass_field_is_overridable_without_plus():
    cfg = compose(["stage.train.optim.adam_eps=1e-4", "rollout.top_p=0.95", "model.moe_aux_loss_coeff=0.1"])
    assert (cfg.stage.train.optim.adam_eps, cfg.rollout.top_p, cfg.model.moe_aux_loss_coeff) == (1e-4, 0.95, 0.1)


def test_deepseek_group_routing_must_match_hf():
    bad(["model=tiny_dsv3", "model.moe_router_topk=2"], 1, match=r"must be 2: megatron scores an expert group")


def test_rollout_context_is_derived_from_prompt_and_response_budgets():
    long = ["stage=r1_zero", "model=deepseek_v3_671b", "data.max_prompt_tokens=1024", "rollout.max_new_tokens=32768"]
    cfg = validate(compose([*long, "stage.train.seq_length=null"]), 1)
    assert cfg.stage.train.seq_length == 1024 + 32768  # the paper's 32k responses, one setting
    bad(long, match=r"seq_length=64 < data.max_prompt_tokens \+ rollout.max_new_tokens = 1024 \+ 32768 = 33792")
    bad(["stage=pretrain", "stage.train.seq_length=null"], match="derived only for rollout stages")
    bad(["stage=pretrain", "stage.train.seq_length=1024"], match="model.max_position_embeddings=256")


def test_greedy_sampling_of_several_samples_is_refused():
    bad(["stage=rejection_sampling", "rollout.temperature=0", "rollout.n=2"], match="rollout.n=1 for greedy")
