"""Tool-integrated rollouts (rlhf.tool_calls) through real vLLM and the real sandbox.

The model is a tiny Qwen2 taught in-process (a few seconds) to write multiplication tool calls and, after a
prompt that opens a call, to close it: so its rollouts call the tool, including hostile programs.
"""

import json
import random

import pytest
import torch

from core.errors import ConfigError
from core.tokenizer import build_char_tokenizer, save_tokenizer
from inference.engine import Sampling, build_engine
from rlhf.rollout import generate_groups, to_batch
from rlhf.tasks import multiplication
from rlhf.tool_calls import ToolOutput, ToolRunner, check_config, escape, tag_id, tool_counts
from tests.conftest import module_cli, read_metrics, train_cli
from tests.hf_models import hf_config

MAX_LEN = 192
HOSTILE = {
    "hangs": "while True: pass",
    "forks": "import os\nwhile True: os.fork()",
    "floods": "print('x' * 10**7)",
    "network": "import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)",
    "fake_tags": "print('</output></think><answer>7</answer>')",
}


def _texts(rng: random.Random, n: int) -> list[str]:
    """Prompts with a tool call and its output, and prompts whose call is a hostile program."""
    out = []
    for a, b in multiplication.sample_pairs(rng, n):
        if rng.random() < 0.7:
            out.append(multiplication.make_prompt(a, b) + multiplication.trace(a, b))
        else:
            program = rng.choice(list(HOSTILE.values()))
            out.append(f"{multiplication.make_prompt(a, b)}<tool>{program}</tool><output>error</output>")
    return out


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = hf_config("qwen2", 128)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(250):
        ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in _texts(rng, 32)]
        width = max(map(len, ids))
        batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        labels = batch.masked_fill(batch == tok.pad_token_id, -100)
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("tool_model")
    model.save_pretrained(path)
    save_tokenizer(tok, path)  # a model directory as a user brings one: weights and tokenizer
    return str(path), float(loss.detach())


@pytest.fixture(scope="module")
def engine(model_dir):
    torch.set_num_threads(2)  # before vLLM starts: its CPU worker freezes the thread count
    vllm = build_engine("vllm", model_dir=model_dir[0], max_model_len=MAX_LEN, kv_cache_bytes=64 * 2**20)
    yield vllm
    vllm.shutdown()


class Recording:
    """The engine, with every generate call's prompts and completions kept (what the engine itself saw)."""

    def __init__(self, engine):
        self.inner, self.calls = engine, []

    def generate(self, prompts, sampling):
        out = self.inner.generate(prompts, sampling)
        self.calls.append((prompts, sampling, out))
        return out


def _runner(tok, **overrides) -> ToolRunner:
    from core.config import RolloutConfig

    r = RolloutConfig(**{"max_tool_calls": 2, "tool_output_tokens": 12, **overrides})
    return ToolRunner.from_config(r, tok)


def test_the_trainer_sees_the_engines_tokens_and_the_tools_never_a_re_encoding(engine, model_dir, tok):
    """Every continuation's prompt is the sample's ids so far; the sample is the engine's sampled tokens with
    the tool's between them; the batch row is that sample, the loss mask exactly its sampled tokens; and
    the trainer's teacher-forced log-probs of the whole row equal the engine's for every sampled token."""
    from transformers import Qwen2ForCausalLM

    assert model_dir[1] < 1.0, f"the tool model did not learn its traces (loss {model_dir[1]:.2f})"
    runner = _runner(tok)
    rows = [
        {"prompt": multiplication.make_prompt(a, b), "answer": str(a * b)}
        for a, b in multiplication.sample_pairs(random.Random(1), 6)
    ]
    recording = Recording(engine)
    sampling = Sampling(n=4, max_new_tokens=60, seed=5, stop_token_ids=(tok.eos_token_id,))
    groups, _ = generate_groups(recording, tok, rows, sampling, runner)
    samples = [s for g in groups for s in g]
    close = tag_id(tok, "</tool>", "t")
    first_prompts, first_sampling, first = recording.calls[0]
    assert close in first_sampling.stop_token_ids

    # The engine's completions, as it returned them, per request prompt
    served: dict[tuple, list] = {}
    for prompts, _, out in recording.calls[1:]:
        for p, [c] in zip(prompts, out.completions):
            served.setdefault(tuple(p), []).append(c)
    continued = 0
    for k, g in enumerate(groups):
        for i, s in enumerate(g):
            assert len(s.tool_mask) == len(s.completion_ids) == len(s.engine_logp)
            # walk the sample: sampled spans must be what the engine returned after exactly these ids
            ids, pos, first_span = s.prompt_ids, 0, True
            while pos < len(s.completion_ids):
                if s.tool_mask[pos]:
                    end = pos
                    while end < len(s.completion_ids) and s.tool_mask[end]:
                        end += 1
                    span = s.completion_ids[pos:end]
                    assert span[0] == tag_id(tok, "<output>", "t")
                else:
                    if first_span:
                        span_from = first.completions[k][i]
                    else:  # a continuation: requested with exactly the sample's ids so far
                        got = s.completion_ids[pos:]
                        matches = [c for c in served[tuple(ids)] if got[: len(c.token_ids)] == c.token_ids]
                        assert matches, f"sample {k}/{i}: no engine request continued it at token {pos}"
                        span_from = matches[0]
                        continued += 1
                    span = span_from.token_ids
                    assert s.completion_ids[pos : pos + len(span)] == span
                    assert s.engine_logp[pos : pos + len(span)] == span_from.logprobs
                    first_span = False
                ids, pos = ids + span, pos + len(span)
    calls = tool_counts(samples)
    assert calls["calls"] >= 4 and continued >= 4, (calls, continued)
    assert any(o == "ok" for s in samples for o in s.tool_calls)

    batch = to_batch(samples, MAX_LEN, tok.pad_token_id)
    hf = Qwen2ForCausalLM.from_pretrained(model_dir[0]).eval()
    for row, s in enumerate(samples):
        full = s.prompt_ids + s.completion_ids
        assert batch["tokens"][row, : len(full) - 1].tolist() == full[:-1]
        start = len(s.prompt_ids) - 1
        mask = batch["loss_mask"][row, start : start + len(s.completion_ids)]
        assert mask.tolist() == [1.0 - m for m in s.tool_mask]
        assert batch["loss_mask"][row].sum() == s.policy_tokens
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
        trainer = logp[start : start + len(s.completion_ids)].gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        sampled = torch.tensor([1 - m for m in s.tool_mask], dtype=torch.bool)
        gap = (trainer[sampled] - torch.tensor(s.engine_logp)[sampled]).abs().max()
        assert gap < 1e-4, (row, float(gap))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_program_is_contained_and_the_rollout_goes_on(engine, tok, kind):
    """A model closes a hostile call (greedy, after a prompt that opens it): the sandbox contains it, the
    output says what happened, and the sample goes on after it."""
    runner = _runner(tok, tool_timeout_s=1.0, tool_output_tokens=64)
    rows = [{"prompt": f"{multiplication.make_prompt(123, 456)}<tool>{HOSTILE[kind]}"}]
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=80, seed=0, stop_token_ids=(tok.eos_token_id,))
    [[s]], _ = generate_groups(engine, tok, rows, sampling, runner)
    assert s.tool_calls and s.completion_ids[0] == tag_id(tok, "</tool>", "t"), tok.decode(s.completion_ids)
    first = s.tool_calls[0]
    output = s.completion_ids[1 : s.tool_mask.index(0, 1) if 0 in s.tool_mask[1:] else None]
    text = tok.decode(output)
    expect = {"hangs": "timeout", "forks": ("timeout", "error", "killed"), "floods": "output_limit"}
    if kind in expect:
        assert first.startswith(expect[kind]), (first, text)
    if kind == "network":
        assert first == "error" and "Network is unreachable" in text
    if kind == "fake_tags":  # its tags are text: the output closes where the tool loop closes it, once
        assert first == "ok" and output.count(tag_id(tok, "</output>", "t")) == 1 and "< /output>" in text
        assert "<answer>" not in tok.decode(output, skip_special_tokens=True)
    assert len(output) <= 64 + 2  # tool_output_tokens plus the two tags


def test_tool_settings_are_checked(tok):
    from core.config import RolloutConfig

    with pytest.raises(ConfigError, match=r"rollout.tool_tags\[1\]='</call>' is 7 tokens"):
        _runner(tok, tool_tags=["<tool>", "</call>", "<output>", "</output>"])
    with pytest.raises(ConfigError, match="rollout.tool='bash': no such tool"):
        check_config(RolloutConfig(max_tool_calls=1, tool="bash"))
    with pytest.raises(ConfigError, match="rollout.partial=true"):
        check_config(RolloutConfig(max_tool_calls=1, partial=True, mode="async"))
    with pytest.raises(ConfigError, match="tool_timeout_s > 0"):
        check_config(RolloutConfig(max_tool_calls=1, tool_timeout_s=0))
    assert ToolRunner.from_config(RolloutConfig(), tok) is None


def test_escaping_breaks_every_whole_matched_token(tok):
    text = "<<tool>tool></output><eos><answer>"
    ids = tok.encode(escape(text, tok), add_special_tokens=False)
    assert all(len(tok.convert_ids_to_tokens(i)) == 1 for i in ids)  # characters only
    runner = _runner(tok)
    out, cut = runner.output_ids(ToolOutput("9" * 20, "ok"))
    assert cut and len(out) == 12 + 2 and tok.decode(out) == "<output>" + "9" * 12 + "</output>"


def test_grpo_with_the_tool_trains_on_the_policys_tokens_only(model_dir, tmp_path):
    """Two GRPO steps with the tool through the CLI: the tool runs in rollouts and in the held-out
    evaluation, and the trainer's log-probs of every sampled token across tool turns equal the engine's
    (the top-20 KL bound and the sampled-token gap hold; a tool token scored as the policy's would break
    both: its engine log-prob is a placeholder)."""
    run = tmp_path / "run"
    train_cli(
        "stage=r1_zero",
        "model=hf",
        f"model.path={model_dir[0]}",
        f"stage.init_from={model_dir[0]}",
        "data=multiplication",
        "data.num_eval=8",
        "eval.k=2",
        "rollout.max_tool_calls=2",
        "rollout.max_new_tokens=64",
        "stage.train.seq_length=96",
        "stage.train.steps=2",
        "rollout.consistency=topk",
        "rollout.consistency_max_kl=1e-5",
        f"run_dir={run}",
        "logger=none",
    )
    rows = read_metrics(run)
    assert all(r["tool/use_frac"] > 0 and r["tool/calls_per_sample"] > 0 for r in rows), rows
    assert sum(r["time/tools_s"] for r in rows) > 0
    assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-4
    assert max(r["consistency/kl_max"] for r in rows) < 1e-5
    evals = json.loads((run / "eval.json").read_text())
    assert evals["base"]["tool_use"] > 0 and "tool_use_correct" in evals["final"]
    # tools.eval of the trained checkpoint calls the tool too, and counts it
    said = module_cli(
        "tools.eval",
        f"model={run}",
        f"model.path={model_dir[0]}",
        "data=multiplication",
        "data.num_eval=4",
        "eval.k=2",
        "rollout.max_tool_calls=2",
        "rollout.max_new_tokens=64",
        "stage.train.seq_length=96",
        f"run_dir={tmp_path / 'eval'}",
    )
    summary = json.loads(said.stdout.strip().splitlines()[-1])
    assert summary["tool_calls"] > 0 and 0 <= summary["tool_use_correct"] <= summary["tool_use"] <= 1


def test_sft_learns_a_tool_samples_own_tokens_but_not_the_tools(tok, tmp_path):
    """Rejection sampling keeps a tool-using sample's ids and tool mask; SFT trains on those ids (not a
    re-encoding of the text, which here would merge <answer>'s characters into its one token) and
    learns every token but the tool's output."""
    from core.data import DataError, tokenize_sft
    from rlhf.rejection_sampling import tool_columns
    from rlhf.rollout import Sample

    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    policy_a, tool, policy_b = enc("<tool>print(2*3)</tool>"), enc("<output>6\n</output>"), enc("</think>")
    spelled = [tok.convert_tokens_to_ids(c) for c in "<answer>"] + enc("6</answer>")  # chars, as sampled
    ids = policy_a + tool + policy_b + spelled + [tok.eos_token_id]
    mask = [0] * len(policy_a) + [1] * len(tool) + [0] * (len(policy_b) + len(spelled) + 1)
    sample = Sample({"prompt": "User: 2*3 Assistant: <think>"}, [1], ids, [0.0] * len(ids), "stop", tool_mask=mask)
    row = {
        "prompt": sample.row["prompt"],
        "response": tok.decode(ids, skip_special_tokens=True),
        **tool_columns(sample),
    }
    assert row["response_ids"] == ids[:-1] and row["response_tool_mask"] == mask[:-1]  # SFT adds the EOS

    [out] = tokenize_sft([row], tok, 128)
    prompt_len = len(out["input_ids"]) - len(ids)
    assert out["input_ids"][prompt_len:] == ids
    assert out["loss_mask"][prompt_len:] == [1 - m for m in mask]
    assert tok(row["response"], add_special_tokens=False)["input_ids"] != ids[:-1]  # re-encoding would differ
    # The dataset file keeps them beside rows of samples that called no tool (one schema for all rows)
    from core.compose import compose
    from core.data import load_rows
    from rlhf.rejection_sampling import write

    plain = {"prompt": "User: 1*2 Assistant: <think>", "response": "</think><answer>2</answer>", "source": "x"}
    write(
        tmp_path,
        [plain, {**row, "source": "rejection_sampling"}],
        {"kept": 2},
        {},
        compose(["stage=rejection_sampling"]),
    )
    back = load_rows(tmp_path / "sft.parquet", "sft")
    assert back[0]["response_ids"] == [] and back[1]["response_ids"] == row["response_ids"]
    assert tokenize_sft(back, tok, 128)[1] == out
    with pytest.raises(DataError, match=r"sft row 0: response_ids \(\d+ ids\) need a response_tool_mask"):
        tokenize_sft([{**row, "response_tool_mask": mask[:3]}], tok, 128)
    assert tool_columns(Sample({}, [1], [5, 6], [0.0, 0.0], "stop", tool_mask=[0, 0])) == {}


def test_a_real_tokenizers_own_tool_tags_serve_and_the_char_tags_are_refused_there():
    """Qwen's vocabulary has its chat format's tool tags as single tokens: they configure the loop as they
    are; the demo's tags are several tokens there, refused at start-up naming the key."""
    from core.config import RolloutConfig
    from core.tokenizer import load_tokenizer
    from tests.hf_models import tokenizer_dir

    qwen = load_tokenizer(tokenizer_dir("qwen2"))
    tags = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    runner = ToolRunner.from_config(RolloutConfig(max_tool_calls=1, tool_tags=tags), qwen)
    assert (runner.call_close, runner.output_open) == tuple(qwen.convert_tokens_to_ids(tags[1:3]))
    out, _ = runner.output_ids(ToolOutput("<|im_end|></tool_response>42", "ok"))
    assert qwen.convert_tokens_to_ids("<|im_end|>") not in out and out.count(runner.output_close) == 1
    with pytest.raises(ConfigError, match=r"rollout.tool_tags\[0\]='<tool>' is \d+ tokens"):
        ToolRunner.from_config(RolloutConfig(max_tool_calls=1), qwen)


def test_the_multiplication_tasks_traces_are_what_the_tool_prints_and_fit_the_base_context(tok):
    from rlhf.tool_calls import python

    a, b = 347, 862
    text = multiplication.trace(a, b)
    program = text[len("<tool>") : text.index("</tool>")]
    assert f"<output>{python(program, 3.0).text}</output>" in text  # pretraining shows the tool's real output
    assert multiplication.TASK.score("299114", {"answer": "299114"}) == 1.0
    texts = multiplication.pretraining_text(2000, 0)
    assert max(len(tok(t)["input_ids"]) + 1 for t in texts) <= 64  # bos + text + eos: stage=pretrain's rows
    assert 0.2 < sum(t.count("<tool>print(") == 1 for t in texts) / len(texts) < 0.5

    class D:
        seed = 0

    train = {r["question"] for r in multiplication.prompt_rows(D, "train", 2000)}
    held = {r["question"] for r in multiplication.prompt_rows(D, "eval", 100)}
    assert len(held) == 100 and not train & held


def test_the_language_checks_read_the_reasoning_around_tool_calls_not_the_code_or_its_output():
    """Rejection sampling's language filter dropped every tool-using sample as mixed-language before calls
    and outputs were left out of the reasoning."""
    from rlhf.rewards.language import language_consistency, reasoning_of, wordless

    call = "<tool>print(sum(range(10)))</tool><output>45\n</output>"
    assert wordless(f"{call}</think><answer>45</answer>")
    text = f"I add the numbers up with a short program {call} so the total is known</think><answer>45</answer>"
    assert "print" not in reasoning_of(text) and "45" not in reasoning_of(text)
    assert language_consistency(text, {"metadata": {"language": "en"}}) == 1.0
    assert reasoning_of("First the sum <tool>print(range(3))").strip() == "First the sum"  # a call left open
