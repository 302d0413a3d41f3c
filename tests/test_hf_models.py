"""Post-training a real Hugging Face model: `model=hf model.path=DIR` for the qwen2, qwen3, llama and
deepseek_v3 families, each a locally built directory with its real tokenizer (tests/hf_models.py).

One worker process checks every family's architecture, weight import, logits and export; one R1-Zero run
(qwen3: chat template, GSM8K-schema JSONL) checks the stage end to end, and its export answers a chat
prompt in vLLM and transformers alike.
"""

import json
import sys

import pytest

from core.compose import compose
from core.errors import ConfigError
from tests.conftest import ROOT, module_cli, run_worker, train_cli
from tests.hf_models import FAMILIES, make_hf_model

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


def _gsm8k(path, n):
    rows = [
        {"question": f"Tom has {a} apples and buys {a + 3} more. How many?", "answer": f"{a}+{a + 3}\n#### {2 * a + 3}"}
        for a in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_r1_zero_on_an_hf_directory_with_chat_prompts_and_a_chat_ready_export(workdir, tmp_path):
    hf_dir = make_hf_model("qwen3", workdir / "qwen3")
    run = tmp_path / "r1_zero"
    data = _gsm8k(tmp_path / "gsm8k.jsonl", 12)
    train_cli(
        "stage=r1_zero", "model=hf", f"model.path={hf_dir}", f"stage.init_from={hf_dir}", "data=jsonl",
        f"data.train_path={data}", "data.prompt_key=question", "data.answer_format=gsm8k", "data.num_eval=2",
        "data.template=chat", "stage.train.steps=2", "stage.rl.prompts_per_step=2", "rollout.n=2",
        "stage.train.micro_batch_size=2", "stage.train.global_batch_size=4", "rollout.max_new_tokens=8",
        "stage.train.seq_length=80", "eval.k=1", "logger=none", f"run_dir={run}",
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/logprob_diff_max" in r]
    assert len(steps) == 2 and all(r["rollout/logprob_diff_max"] <= 1e-4 for r in steps), steps
    assert (run / "tokenizer" / "chat_template.jinja").is_file()  # the run dir keeps the model's tokenizer
    export = tmp_path / "export"
    module_cli("tools.convert", "export", run / "checkpoints", export, "model=hf", f"model.path={hf_dir}")
    out = tmp_path / "chat.json"
    run_worker([sys.executable, ROOT / "tests" / "dist" / "export_chat_worker.py", export, out], timeout=600)
    said = json.loads(out.read_text())
    assert said["chat_template"] and said["stop_ids"] == [151643, 151645]
    assert len(said["vllm"]) == 8 and said["vllm"] == said["transformers"], said


@pytest.mark.slow
def test_sft_on_chat_rows_then_eval_on_math_schema_rows(workdir, tmp_path):
    hf_dir = make_hf_model("qwen3", workdir / "qwen3")
    chats = tmp_path / "chats.jsonl"
    turns = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5</think>\\boxed{5}"},
    ]
    chats.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(8)))
    sft = tmp_path / "sft"
    train_cli(
        "stage=sft", "model=hf", f"model.path={hf_dir}", f"stage.init_from={hf_dir}", "data=jsonl",
        f"data.train_path={chats}", "stage.train.steps=2", "stage.train.micro_batch_size=2",
        "stage.train.global_batch_size=4", "stage.train.seq_length=64", "logger=none", f"run_dir={sft}",
    )  # fmt: skip
    losses = [json.loads(line)["train/loss"] for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(0 < x < 20 for x in losses)  # log(151,669) = 11.9 at random weights
    math = tmp_path / "math.jsonl"
    rows = [{"problem": f"Compute {a}/2.", "solution": f"It is $\\boxed{{\\frac{{{a}}}{{2}}}}$."} for a in range(3)]
    math.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    module_cli(
        "tools.eval", f"model={sft}", "data=jsonl", f"data.train_path={math}", f"data.eval_path={math}",
        "data.prompt_key=problem", "data.answer_key=solution", "data.answer_format=boxed", "reward.answer=boxed",
        "eval.k=1", "rollout.max_new_tokens=8", "stage.train.seq_length=64", "logger=none", f"run_dir={out}",
    )  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    assert result["n_prompts"] == 3 and result["model_preset"] == "hf" and 0.0 <= result["pass@1"] <= 1.0
