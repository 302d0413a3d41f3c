"""transformers' generate as the reference engine: slow, simple, and the baseline vLLM is checked against."""

from __future__ import annotations

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
        if not prompts:
            return Rollout(completions=[])
        prompts, truncated = self.fit_prompts(prompts, sampling, self.overlong_prompt)
        gen = torch.Generator().manual_seed(self.seed if sampling.seed is None else sampling.seed)
        out = []
        for prompt in prompts:
            out.append([self._sample(prompt, sampling, gen) for _ in range(sampling.n)])
        return Rollout(completions=out, truncated_prompts=truncated)

    def _sample(self, prompt: list[int], s: Sampling, gen: torch.Generator) -> Completion:
        ids = torch.tensor([prompt])
        tokens, logprobs, past = [], [], None
        for _ in range(s.max_new_tokens):
            out = self.model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            logp = torch.log_softmax(logits / (s.temperature or 1.0), -1)  # vLLM's processed_logprobs
            if s.temperature == 0:
                token = int(logp.argmax())
            else:
                probs = logp.exp()
                if s.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                token = int(torch.multinomial(probs, 1, generator=gen))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            if token in s.stop_token_ids:
                return Completion(tokens, logprobs, "stop")
        return Completion(tokens, logprobs, "length")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=True)  # the full state, tied head included

    def dead_reason(self) -> str | None:
        # In-process, so no process can exit under it: it is dead once its model is gone (deleted, or
        # freed after an out-of-memory error); restart() loads it again from model_dir.
        return None if getattr(self, "model", None) is not None else "its model is gone"
