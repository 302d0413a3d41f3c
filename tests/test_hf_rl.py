"""R1-Zero on a Qwen2, a Llama 3 and a DeepSeek-V3 directory (Qwen3's: the README's commands, in
test_hf_models.py): two GRPO steps each with `data.template=chat` prompts from GSM8K-schema rows, the trainer
and the engine agreeing on log-probs after the weights moved; then each run's export answers a chat prompt
with the same greedy tokens in vLLM and transformers.

The families' runs are one CLI start each; their exports and chats share one worker process.
"""

import json
import sys

import pytest

from tests.conftest import ROOT, read_metrics, run_worker, train_cli
from tests.hf_models import make_hf_model, write_rows
from tests.test_hf_models import R1_ZERO_STEPS, assert_chats_alike, assert_engine_follows

FAMILIES = ("qwen2", "llama", "deepseek_v3")
# Llama's run updates exactly on-policy (one minibatch): its old log-probs, which the engine check reads,
# come from the update's own forward instead of a scoring pass.
EXTRA = {"llama": ["stage.rl.minibatches=1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_rl")
    data = write_rows(root)["DATA"]
    runs = {}
    for family in FAMILIES:
        model, runs[family] = make_hf_model(family, root / family), root / "runs" / family
        train_cli(
            "stage=r1_zero",
            "model=hf",
            f"model.path={model}",
            f"stage.init_from={model}",
            "data=jsonl",
            f"data.train_path={data}",
            "data.prompt_key=question",
            "data.answer_format=gsm8k",
            "data.template=chat",
            "data.max_prompt_tokens=72",
            "rollout.max_new_tokens=8",
            "stage.train.seq_length=null",
            f"run_dir={runs[family]}",
            "logger=none",
            *R1_ZERO_STEPS,
            *EXTRA.get(family, []),
        )
    return runs


@pytest.fixture(scope="module")
def chats(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_rl_chats") / "chats.json"
    run_worker([sys.executable, ROOT / "tests" / "dist" / "export_chat_worker.py", out, *runs.values()], timeout=600)
    said = json.loads(out.read_text())
    return {family: said[str(run)] for family, run in runs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_two_grpo_steps_keep_the_engine_on_the_trainers_weights(runs, family):
    run = runs[family]
    assert json.loads((run / "config.json").read_text())["data"]["template"] == "chat"
    assert (run / "tokenizer" / "chat_template.jinja").is_file()  # the model's tokenizer, kept with the run
    assert_engine_follows(read_metrics(run))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_chats_alike_in_vllm_and_transformers(runs, chats, family):
    stop_ids = json.loads((runs[family] / "tokenizer" / "generation_config.json").read_text())["eos_token_id"]
    assert_chats_alike(chats[family], stop_ids=stop_ids if isinstance(stop_ids, list) else [stop_ids])
