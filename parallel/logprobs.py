"""Per-token log-probs and entropy from vocab-parallel logits: exact at any TP without gathering the vocab.

Padded vocab rows (the model's vocab is padded to a multiple that does not depend on TP) are masked
out, so the distribution is the one the exported HF model, and hence vLLM, samples from.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def _mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, temperature: float = 1.0):
    """log π(label | prefix) at temperature, [b, s]; differentiable. Logits are [b, s, v/tp]."""
    scaled = _mask_padded_vocab(logits.float() / temperature, vocab_size)
    return -vocab_parallel_cross_entropy(scaled.clone(), labels)  # it subtracts the max in place


@torch.no_grad()
def token_entropy(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of π(· | prefix) at temperature, [b, s], with three all-reduces over TP."""
    group = ps.get_tensor_model_parallel_group()
    z = _mask_padded_vocab(logits.float() / temperature, vocab_size)
    m = z.max(-1, keepdim=True).values
    torch.distributed.all_reduce(m, torch.distributed.ReduceOp.MAX, group=group)
    z = z - m
    e = torch.exp(z)
    total = e.sum(-1)
    weighted = torch.where(e > 0, e * z, torch.zeros_like(z)).sum(-1)
    for t in (total, weighted):
        torch.distributed.all_reduce(t, group=group)
    return torch.log(total) - weighted / total
