"""One forward/backward over micro-batches through megatron's pipeline schedules, and the optimizer step
that follows it."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from parallel.parallelize import reduce_loss
from parallel.policy import Policy


def token_loss(output: torch.Tensor, loss_mask: torch.Tensor):
    """Per-token loss summed over unmasked tokens; megatron divides by the global token count."""
    mask = loss_mask.float()
    total = (output.float() * mask).sum()
    n = mask.sum().to(torch.int)
    return total, n, {"loss": torch.stack([total.detach(), n.detach().float()])}


def _default_forward(batch: dict, model) -> tuple[torch.Tensor, Callable]:
    out = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return out, lambda o: token_loss(o, batch["loss_mask"])


def forward_backward(
    policy: Policy, micro_batches: list[dict], forward_only: bool = False, forward: Callable = _default_forward
) -> list[Any]:
    """Runs megatron's schedule (1F1B under PP) over this DP rank's micro-batches.

    `forward(batch, model)` returns (output, loss_fn); loss_fn(output) returns (loss_sum, n_tokens, data).
    Returns the loss functions' `data` per micro-batch on the last pipeline stage, [] elsewhere.
    """
    first = micro_batches[0]
    b, s = first["tokens"].shape
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batches = iter([{k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()} for mb in micro_batches])

    def step(data_iterator, model):
        return forward(next(data_iterator), model)

    for chunk in policy.chunks:
        chunk.zero_grad_buffer()
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=batches,
        model=policy.chunks,
        num_microbatches=len(micro_batches),
        seq_length=s // policy.cfg.parallel.context,
        micro_batch_size=b,
        forward_only=forward_only,
    )


def train_step(policy: Policy, micro_batches: list[dict], forward: Callable | None = None) -> dict:
    """One optimizer step (`forward` None: the next-token loss); returns the global token-mean loss, grad
    norm, lr and whether the update ran."""
    policy.optimizer.zero_grad()
    data = forward_backward(policy, micro_batches, forward=forward or _default_forward)
    return optimizer_step(policy, reduce_loss(data))


def optimizer_step(policy: Policy, loss: float | None) -> dict:
    """Applies the grads that forward_backward left, then advances the LR/WD schedule.

    A non-finite loss skips the update: in fp32 megatron's optimizer only catches inf/NaN grads when
    an fp16 loss scaler runs, and would otherwise write NaN into the weights.
    """
    lr = policy.optimizer.param_groups[0]["lr"]
    policy.step += 1
    if loss is None or not math.isfinite(loss):
        policy.optimizer.zero_grad()
        ok, grad_norm = False, float("nan")
    else:
        ok, grad_norm, _ = policy.optimizer.step()
    policy.scheduler.step(increment=1)
    return {"loss": loss, "grad_norm": float(grad_norm or 0.0), "lr": lr, "update_ok": bool(ok)}


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [b, s, v/tp] → full [b, s, v]."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)
