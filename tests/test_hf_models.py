"""Post-training a real Hugging Face model: `model=hf model.path=DIR` for the qwen2, qwen3, llama and
deepseek_v3 families, each a locally built directory with its real tokenizer (tests/hf_models.py).

One worker process checks every family's architecture, weight import, logits and export; the README's
"Post-train your own model" commands run, smaller, on a Qwen3 directory (R1-Zero with chat prompts from
GSM8K-schema rows, SFT on chat rows, rejection sampling, SFT, eval on MATH-schema rows, export), and the
export answers a chat prompt in vLLM and transformers alike.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.compose import compose
from core.errors import ConfigError
from tests.conftest import ROOT, cli_env, run_worker
from tests.hf_models import FAMILIES, make_hf_model, write_rows

LOGITS_TOL = 1e-5  # fp32 kernel-order noise against transformers' eager attention: ~5e-7 measured


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


@pytest.fixture(scope="module")
def results(workdir):
    out = workdir / "families.json"
    run_worker([sys.executable, ROOT / "tests" / "dist" / "hf_dir_worker.py", workdir, out, *FAMILIES], timeout=900)
    return {r["family"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_directory_builds_imports_and_exports(results, family):
    r = results[family]
    assert r["model_family"] == family and r["vocab_size"] == r["tokenizer_len"]  # 151,669 or 129,280
    assert r["never_written"] == [], "megatron tensors the directory's weights never wrote"
    assert r["logits_max_diff"] <= LOGITS_TOL, r
    assert r["frozen_logits_max_diff"] <= LOGITS_TOL, r  # stage.rl.teacher / stage.sampling.judge = DIR
    assert "reward.models.helpful.path=" in r["rm_refusal"] and "stage=reward_model" in r["rm_refusal"]
    assert r["export_logits_max_diff"] <= LOGITS_TOL, r
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(r["export_files"])
    assert "chat_template.jinja" in r["export_files"] and r["export_stop_ids"] == r["stop_ids"]
    assert r["bos_count"] in (None, 1)  # a chat-rendered prompt carries the template's BOS, once


def test_architecture_fields_come_from_config_json(workdir):
    q3 = compose(["model=hf", f"model.path={make_hf_model('qwen3', workdir / 'qwen3')}"]).model
    assert (q3.family, q3.qk_layernorm, q3.add_qkv_bias, q3.tie_word_embeddings) == ("qwen3", True, False, True)
    llama = compose(["model=hf", f"model.path={make_hf_model('llama', workdir / 'llama')}"]).model
    assert (llama.family, llama.llama3_rope_scaling, llama.rotary_base) == ("llama", 8.0, 500000.0)
    v3 = compose(["model=hf", f"model.path={make_hf_model('deepseek_v3', workdir / 'deepseek_v3')}"]).model
    assert (v3.multi_latent_attention, v3.kv_lora_rank, v3.num_moe_experts, v3.first_k_dense_replace) == (
        True,
        512,
        4,
        1,
    )
    assert v3.moe_router_score_function == "sigmoid" and v3.moe_router_enable_expert_bias


def test_unsupported_or_contradicted_architectures_are_refused(workdir, tmp_path):
    q3 = make_hf_model("qwen3", workdir / "qwen3")
    with pytest.raises(ConfigError, match=r"model.num_layers=7, but .* says 2"):
        compose(["model=hf", f"model.path={q3}", "model.num_layers=7"])
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"architectures=\['GPT2LMHeadModel'\].*Qwen3ForCausalLM"):
        compose(["model=hf", f"model.path={other}"])
    with pytest.raises(ConfigError, match="no config.json"):
        compose(["model=hf", f"model.path={tmp_path}"])
    llama = tmp_path / "llama"
    llama.mkdir()
    cfg = json.loads((make_hf_model("llama", workdir / "llama") / "config.json").read_text())
    cfg["rope_parameters"]["low_freq_factor"] = 2.0
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="low_freq_factor=2.0"):
        compose(["model=hf", f"model.path={llama}"])


# Two small GRPO steps. Random weights never earn the accuracy or format reward; the language-consistency
# reward varies between samples, so the steps move the weights and the engine must follow them.
R1_ZERO_STEPS = ["data.num_eval=2", "stage.train.steps=2", "stage.rl.prompts_per_step=2", "rollout.n=2", "eval.k=1",
                 "stage.train.micro_batch_size=2", "stage.train.global_batch_size=4",
                 "+reward.weights.language_consistency=1.0"]  # fmt: skip

# The README's sizes are a real model's; each command runs here with these replaced and added (run_dir name ->
# ({key: smaller value}, [extra overrides])), on a tiny Qwen3 directory and a few rows.
SMALLER = {
    "r1_zero": (
        {"data.max_prompt_tokens": 72, "rollout.max_new_tokens": 8},
        R1_ZERO_STEPS,
    ),
    # Memorises one chat row, so that rejection sampling has a verified-correct sample to keep.
    "cold_start": (
        {"stage.train.seq_length": 64},
        ["stage.epochs=null", "stage.train.steps=40", "stage.train.micro_batch_size=4", "stage.train.global_batch_size=4",
         "stage.train.optim.lr=1e-2", "stage.train.optim.schedule=constant", "stage.train.optim.warmup_steps=0"],
    ),
    "rs": (
        {"data.max_prompt_tokens": 48, "rollout.max_new_tokens": 24},
        ["data.num_eval=2", "rollout.n=2", "rollout.temperature=0.3"],
    ),
    "sft": (
        {"stage.train.seq_length": 64},
        ["stage.epochs=null", "stage.train.steps=2", "stage.train.micro_batch_size=2", "stage.train.global_batch_size=2"],
    ),
    "eval": ({}, ["eval.k=1", "rollout.max_new_tokens=8", "stage.train.seq_length=64"]),
    "hf": ({}, []),
}  # fmt: skip


def readme_commands() -> tuple[list[str], list[str]]:
    """(shell assignments, commands) of the README's "Post-train your own model" block."""
    block = (ROOT / "README.md").read_text().split("<!-- own-model:begin")[1].split("<!-- own-model:end")[0]
    lines = [x for x in block.splitlines()[1:] if x.strip() and not x.startswith(("#", "```"))]
    return [x for x in lines if not x.startswith("python")], [x for x in lines if x.startswith("python")]


def smaller(command: str) -> tuple[str, str]:
    name = re.search(r"(?:run_dir=runs/mine/|runs/mine/)(\w+)\S*\s*(?:\$HF)?$", command).group(1)
    replace, extra = SMALLER[name]
    for key, value in replace.items():
        command, found = re.subn(rf"(?<=\s){re.escape(key)}=\S+", f"{key}={value}", command)
        assert found == 1, (key, command)
    return name, " ".join([command, *extra, *(["logger=none"] if "rlhf.train" in command else [])])


@pytest.mark.slow
def test_the_readmes_own_model_commands(workdir, tmp_path):
    """R1-Zero, cold-start SFT on chat rows, rejection sampling, SFT, eval on MATH-schema rows and a chat-ready
    export, with the README's commands on an HF directory: the model's tokenizer and chat template throughout."""
    hf_dir = make_hf_model("qwen3", workdir / "qwen3")
    assignments, commands = readme_commands()
    assert [smaller(c)[0] for c in commands] == list(SMALLER)
    files = write_rows(tmp_path)
    given = f"MODEL={hf_dir} " + " ".join(f"{k}={v}" for k, v in files.items())
    for command in commands:
        name, command = smaller(command)
        script = "\n".join(["set -e", given, *assignments[1:], command])
        env = cli_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `python`: the venv's, as activated
        proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    runs = tmp_path / "runs" / "mine"
    steps = [r for r in map(json.loads, (runs / "r1_zero" / "metrics.jsonl").read_text().splitlines())]
    assert_engine_follows(steps)
    assert (runs / "r1_zero" / "tokenizer" / "chat_template.jinja").is_file()  # the model's tokenizer is kept
    assert json.loads((runs / "rs" / "dataset.json").read_text())["kept"] >= 1
    result = json.loads((runs / "eval" / "eval.json").read_text())
    assert result["n_prompts"] == 3 and result["model_preset"] == "hf"
    out = tmp_path / "chat.json"
    run_worker([sys.executable, ROOT / "tests" / "dist" / "export_chat_worker.py", out, runs / "hf"], timeout=600)
    assert_chats_alike(json.loads(out.read_text())[str(runs / "hf")], stop_ids=[151643, 151645])


def assert_engine_follows(steps: list[dict]) -> None:
    """Each GRPO step moved the weights, and the engine's log-probs of its samples matched the trainer's."""
    trained = [r for r in steps if "rollout/logprob_diff_max" in r]
    assert len(trained) == 2 and all(r["train/grad_norm"] > 0 and not r["train/skipped"] for r in trained), trained
    gaps = [r["rollout/logprob_diff_max"] for r in trained]
    assert max(gaps) <= 1e-4, gaps  # step 2's samples came from the engine after step 1's weight sync


def assert_chats_alike(said: dict, stop_ids: list[int]) -> None:
    """An export answered a chat prompt with the same greedy tokens (and log-probs) in vLLM and transformers."""
    assert said["chat_template"] and said["stop_ids"] == stop_ids, said
    assert len(said["vllm"]) == 8 and said["vllm"] == said["transformers"], said
    assert said["logprob_gap"] <= 1e-4, said
