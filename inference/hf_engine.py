"""transformers as the reference engine: the baseline vLLM is checked against and compared with.

All samples of a call decode as one batch with a KV cache, as transformers' batched `generate` (and TRL's
default GRPO rollout) does, so `tools.bench rollout`'s ours_over_hf compares with what people run."""

from __future__ import annotations

import time
from typing import Iterable

import torch

from inference.engine import ENGINES, Completion, Engine, Rollout, Sampling


@ENGINES.register("hf")
class HFEngine(Engine):
    def __init__(
        self,
        model_dir: str,
        max_model_len: int,
        dtype: str = "float32",
        seed: int = 0,
        overlong_prompt: str = "error",
        **unused,
    ):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.max_model_len, self.overlong_prompt, self.seed = max_model_len, overlong_prompt, seed

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        """All prompts × n samples decoded together: one left-padded batch, one KV cache, one forward per
        new token (as transformers' batched `generate`), until every row has stopped."""
        if not prompts:
            return Rollout(completions=[])
        if sampling.prompt_seeds is not None:  # one generator draws for the whole batch
            raise ValueError("the hf engine seeds a whole call, not each prompt (Sampling.prompt_seeds): use vllm")
        prompts, truncated = self.fit_prompts(prompts, sampling, self.overlong_prompt)
        gen = torch.Generator().manual_seed(self.seed if sampling.seed is None else sampling.seed)
        rows = [p for p in prompts for _ in range(sampling.n)]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        stops = torch.tensor(sorted(sampling.stop_token_ids), dtype=torch.long)
        tokens, logprobs, tops = [], [], []
        done = torch.zeros(len(rows), dtype=torch.bool)
        past, step_ids = None, ids
        for i in range(sampling.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            out = self.model(
                step_ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            if i < sampling.min_new_tokens:  # as vLLM's min_tokens: no stop token yet
                logits[:, stops] = float("-inf")
            token, logp, top = _sample(logits, sampling, gen)
            tokens.append(token)
            logprobs.append(logp)
            tops.append(top)
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
            step_ids = token[:, None]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
        completions = [_completion(i, tokens, logprobs, tops, stops) for i in range(len(rows))]
        out = [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]
        return Rollout(completions=out, truncated_prompts=truncated, prompts=prompts)

    @torch.no_grad()
    def score(self, tokens: list[int]) -> list[float]:
        logp = torch.log_softmax(self.model(torch.tensor([tokens])).logits[0].float(), -1)
        return [float(logp[i - 1, t]) for i, t in enumerate(tokens) if i]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        state = dict(named_tensors)
        t0 = time.perf_counter()
        self.model.load_state_dict(state, strict=True)  # the full state, tied head included: strict names it
        return {"tensors": len(state), "load_s": time.perf_counter() - t0}

    def dead_reason(self) -> str | None:
        # In-process, so no process can exit under it: it is dead once its model is gone (deleted, or
        # freed after an out-of-memory error); restart() loads it again from model_dir.
        return None if getattr(self, "model", None) is not None else "its model is gone"


def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator):
    """Next token per row, its log-prob at the sampling temperature before top-p (what the trainer
    recomputes), and with s.top_logprobs the most likely ids and their log-probs (else None)."""
    logp = torch.log_softmax(logits / (s.temperature or 1.0), -1)
    top = None
    if s.top_logprobs:
        k = logp.shape[-1] if s.top_logprobs < 0 else min(s.top_logprobs, logp.shape[-1])
        values, ids = logp.topk(k, -1)
        top = (ids.to(torch.int32), values)
    if s.temperature == 0:
        token = logp.argmax(-1)
    else:
        probs = logp.exp()
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        token = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0], top


def _completion(row: int, tokens: list, logprobs: list, tops: list, stops: torch.Tensor) -> Completion:
    """Row `row`'s tokens up to and including its first stop token ("stop"), or all of them ("length")."""
    ids = [int(t[row]) for t in tokens]
    stop = next((i for i, t in enumerate(ids) if t in stops), None)
    end = len(ids) if stop is None else stop + 1
    c = Completion(ids[:end], [float(lp[row]) for lp in logprobs[:end]], "length" if stop is None else "stop")
    if tops and tops[0] is not None:
        c.top_ids = torch.stack([ids_[row] for ids_, _ in tops[:end]])
        c.top_logprobs = torch.stack([lp[row] for _, lp in tops[:end]])
    return c
