"""Per-token log-probs and entropy from vocab-parallel logits: exact at any TP without gathering the vocab.

Padded vocab rows (the model's vocab is padded to a multiple that does not depend on TP) are masked
out, so the distribution is the one the exported HF model, and hence vLLM, samples from.

`candidate_logprobs` scores several tokens per position (the rollout engine's top-k, for the train↔engine
mismatch oracle, rlhf.consistency) the same way.

Two paths give the same numbers:
- `token_logprobs` / `token_entropy` take full logits [b, s, v/tp] (the model's ordinary output).
- `chunked_logprobs` (and `head_logprobs`, its GPTModel `output_processor` form) take the decoder's
  hidden states and apply the output layer one chunk of tokens at a time. At a 129k-152k vocabulary
  the fp32 logits of a whole micro-batch are gigabytes; here only one chunk's exist at once, and the
  backward recomputes each chunk's logits instead of keeping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch.autograd.function import once_differentiable

# Tokens per chunk: at a 129,280 vocab one fp32 chunk of logits is 1024 × 129280 × 4 B ≈ 0.5 GB per
# TP rank, and a chunk's forward or recompute holds about three such tensors at its peak.
CHUNK_TOKENS = 1024


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


def _entropy(z: torch.Tensor, lean: bool = False) -> torch.Tensor:
    """Entropy over the last (vocab-parallel) dim of scaled, masked logits; three all-reduces over TP.

    `lean` computes the same numbers with two logits-sized temporaries instead of five (the chunked
    path's forward peak); the unchunked path keeps its original form, the baseline it is measured against.
    """
    group = ps.get_tensor_model_parallel_group()
    m = z.max(-1, keepdim=True).values
    torch.distributed.all_reduce(m, torch.distributed.ReduceOp.MAX, group=group)
    z = z - m
    e = torch.exp(z)
    total = e.sum(-1)
    # Masked rows have e = 0 and z ≈ -3.4e38 (or -inf): 0 · z must count as 0, not as a possible NaN.
    if lean:
        weighted = z.mul_(e).masked_fill_((e > 0).logical_not_(), 0.0).sum(-1)
    else:
        weighted = torch.where(e > 0, e * z, torch.zeros_like(z)).sum(-1)
    for t in (total, weighted):
        torch.distributed.all_reduce(t, group=group)
    return torch.log(total) - weighted / total


@torch.no_grad()
def candidate_logprobs(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log π(id | prefix) for k token ids per position, [n, k], from scaled, masked vocab-parallel logits
    [n, v/tp]: each rank contributes the ids in its vocab shard, and the normaliser is the whole vocab's
    (two all-reduces over TP, as for one label). Without grad: the oracle only reads them."""
    group = ps.get_tensor_model_parallel_group()
    m = z.max(-1, keepdim=True).values
    torch.distributed.all_reduce(m, torch.distributed.ReduceOp.MAX, group=group)
    total = torch.exp(z - m).sum(-1, keepdim=True)
    local = z.shape[-1]
    offset = ids - ps.get_tensor_model_parallel_rank() * local
    inside = (offset >= 0) & (offset < local)
    picked = z.gather(-1, offset.clamp(0, local - 1)).masked_fill_(~inside, 0.0) - m * inside
    for t in (total, picked):
        torch.distributed.all_reduce(t, group=group)
    return picked - torch.log(total)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of π(· | prefix) at temperature, [b, s], with three all-reduces over TP."""
    return _entropy(_mask_padded_vocab(logits.float() / temperature, vocab_size))


@dataclass(frozen=True)
class _Head:
    """What turns one chunk of hidden states into scaled, masked fp32 logits, and the chunking."""

    vocab_size: int
    temperature: float
    chunk_tokens: int
    entropy: bool
    scale: Optional[Callable[[torch.Tensor], torch.Tensor]]  # GPTModel._scale_logits (MuP); None = identity

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The same operations as GPTModel's output layer followed by token_logprobs. The division is in
        # place, one logits-sized tensor fewer at the peak: no backward before it (GEMM, cast, MuP
        # scale) reads its own output.
        out = F.linear(hidden, weight)
        if self.scale is not None:
            out = self.scale(out)
        z = out.float()
        del out
        return _mask_padded_vocab(z.div_(self.temperature), self.vocab_size)


class _ChunkedHead(torch.autograd.Function):
    """hidden [n, h], weight [v/tp, h], labels [n], candidates [n, k] (k may be 0) → (log-probs [n],
    entropy [n] or empty, the candidates' log-probs [n, k]), chunk by chunk.

    A custom Function rather than torch.utils.checkpoint so that the forward computes each chunk's
    logits once for both the log-prob and the entropy, and the backward recomputes only what the
    log-prob's gradient needs. It saves only its inputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, candidates, head: _Head):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n if head.entropy else 0, dtype=torch.float32, device=hidden.device)
        cand = torch.empty(candidates.shape, dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, head.chunk_tokens):
            hi = min(lo + head.chunk_tokens, n)
            z = head.logits(hidden[lo:hi], weight)
            if head.entropy:
                ent[lo:hi] = _entropy(z, lean=True)
            if candidates.shape[1]:
                cand[lo:hi] = candidate_logprobs(z, candidates[lo:hi])
            # z is fresh and read by nothing else: the cross entropy may overwrite it in place.
            logp[lo:hi] = -vocab_parallel_cross_entropy(z, labels[lo:hi])
            del z
        ctx.save_for_backward(hidden, weight, labels)
        ctx.head = head
        ctx.mark_non_differentiable(ent, cand)
        return logp, ent, cand

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_ent, _grad_cand):
        hidden, weight, labels = ctx.saved_tensors
        head: _Head = ctx.head
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        n = hidden.shape[0]
        for lo in range(0, n, head.chunk_tokens):
            hi = min(lo + head.chunk_tokens, n)
            with torch.enable_grad():
                h = hidden[lo:hi].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                logp = -vocab_parallel_cross_entropy(head.logits(h, w), labels[lo:hi])
                wrt = [t for t, need in ((h, need_h), (w, need_w)) if need]
                grads = list(torch.autograd.grad(logp, wrt, grad_logp[lo:hi]))
            if need_h:
                grad_h[lo:hi] = grads.pop(0)
            if need_w:
                # Summed in fp32: one GEMM over all tokens (the unchunked path) accumulates in fp32 too.
                g = grads.pop(0).float()
                grad_w = g if grad_w is None else grad_w.add_(g)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    output_layer: torch.nn.Module,
    vocab_size: int,
    temperature: float = 1.0,
    weight: Optional[torch.Tensor] = None,
    chunk_tokens: int = CHUNK_TOKENS,
    entropy: bool = True,
    scale_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    candidates: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """(log π(label | prefix) [b, s], differentiable; entropy [b, s] without grad, or None) from the
    decoder's hidden states [s(/tp under sequence parallelism), b, h] and the model's output layer
    (`weight`: the tied embedding weight when the model shares it, else the layer's own). With
    `candidates` (token ids [b, s, k]) a third element: their log-probs [b, s, k], without grad."""
    if not isinstance(output_layer, ColumnParallelLinear) or output_layer.bias is not None:
        raise NotImplementedError(
            f"chunked log-probs need megatron's bias-free ColumnParallelLinear LM head, got {type(output_layer)}"
        )
    if output_layer.gather_output:
        raise NotImplementedError("chunked log-probs expect vocab-parallel logits (parallel_output=True)")
    if output_layer.config.defer_embedding_wgrad_compute:
        # That mode computes the head's weight grad later from activations the layer's forward
        # buffers; this path bypasses the layer's forward and computes the grad itself.
        raise NotImplementedError("chunked log-probs do not support defer_embedding_wgrad_compute")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    weight = output_layer.weight if weight is None else weight
    group = output_layer.tp_group
    # The collectives ColumnParallelLinear runs around its GEMM, once for all chunks: under sequence
    # parallelism an all-gather of the sequence (reduce-scatter of the grad), else with TP > 1 an
    # all-reduce of the input's grad, since each rank's vocab shard contributes a partial grad.
    if output_layer.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
    elif torch.distributed.get_world_size(group) > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    s, b, h = hidden.shape
    if tuple(labels.shape) != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states [s={s}, b={b}, h={h}]")
    head = _Head(vocab_size, temperature, chunk_tokens, entropy, scale_logits)
    # Token-major [s·b, h] is a view of megatron's contiguous [s, b, h]; only the small labels are transposed.
    k = 0 if candidates is None else candidates.shape[-1]
    token_major = torch.zeros(s * b, 0, dtype=torch.long, device=labels.device)
    if candidates is not None:
        if tuple(candidates.shape[:2]) != (b, s):
            raise ValueError(f"candidates {tuple(candidates.shape)} do not match hidden states [s={s}, b={b}]")
        token_major = candidates.transpose(0, 1).reshape(s * b, k).long()
    logp, ent, cand = _ChunkedHead.apply(hidden.reshape(s * b, h), weight, labels.t().reshape(-1), token_major, head)
    out = (logp.view(s, b).t().contiguous(), ent.view(s, b).t().contiguous() if entropy else None)
    return out if candidates is None else (*out, cand.view(s, b, k).transpose(0, 1).contiguous())


@dataclass(frozen=True)
class LogprobRequest:
    """`output_processor_context` for `head_logprobs`: the labels and how to score them."""

    labels: torch.Tensor  # [b, s]
    vocab_size: int
    temperature: float = 1.0
    chunk_tokens: int = CHUNK_TOKENS
    entropy: bool = True
    candidates: Optional[torch.Tensor] = None  # [b, s, k] token ids also scored (a third output)


def head_logprobs(
    *, hidden_states, output_layer, output_weight, context: LogprobRequest, scale_logits=None, config=None, **_
):
    """GPTModel `output_processor`: on the last pipeline stage the model then returns
    (log-probs [b, s], entropy [b, s] or None[, candidates' log-probs [b, s, k]]) instead of logits.

    GPTModel runs it after the MTP block, as it would the output layer; with the model's
    `_scale_logits` passed only under MuP (elsewhere it is the identity)."""
    use_mup = bool(getattr(config, "use_mup", False))
    return chunked_logprobs(
        hidden_states,
        context.labels,
        output_layer,
        context.vocab_size,
        context.temperature,
        weight=output_weight,
        chunk_tokens=context.chunk_tokens,
        entropy=context.entropy,
        scale_logits=scale_logits if use_mup else None,
        candidates=context.candidates,
    )
