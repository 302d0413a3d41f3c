"""Applies the parallel layout: process groups, megatron model chunks wrapped in DDP, the optimizer,
and one forward/backward over micro-batches through megatron's pipeline schedules."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from core import model as model_lib
from core.config import Config, ConfigError, validate
from parallel import env as launch_env
from parallel.kernels import use_transformer_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init_distributed(cfg: Config) -> launch_env.LaunchEnv:
    """Starts torch.distributed and megatron's process groups; validates the layout first."""
    env = launch_env.detect()
    validate(cfg, env.world_size)
    p = cfg.parallel
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        backend = p.backend if p.backend != "auto" else ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=int(os.environ.get("R1_DIST_TIMEOUT_MIN", 10))),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            context_parallel_size=p.context,
            expert_model_parallel_size=p.expert,
            expert_tensor_parallel_size=p.expert_tensor,
        )
    model_parallel_cuda_manual_seed(cfg.seed)
    return env


def shutdown_model_parallel() -> None:
    """Drops megatron's process groups but keeps torch.distributed, so another layout can follow."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def shutdown() -> None:
    shutdown_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def runtime_config(cfg: Config) -> dict[str, Any]:
    """TransformerConfig fields that are not the architecture: layout, dtype, fusions."""
    p, dtype = cfg.parallel, cfg.stage.train.dtype
    on_gpu = torch.cuda.is_available()
    rt: dict[str, Any] = dict(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        sequence_parallel=p.sequence_parallel,
        params_dtype=DTYPES[dtype],
        pipeline_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        calculate_per_token_loss=True,  # every layout, DP included, reduces to the same token mean
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels need CUDA; on CPU the plain PyTorch paths run.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        moe_permute_fusion=False,
        moe_grouped_gemm=False,
        deterministic_mode=not on_gpu,
    )
    for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
        if getattr(p, name) is not None:  # an uneven pipeline split (DeepSeek-V3's 61 layers at PP 12 or 16)
            rt[name] = getattr(p, name)
    if p.recompute != "none":
        rt.update(
            recompute_granularity=p.recompute,
            recompute_method="uniform" if p.recompute == "full" else None,
            recompute_num_layers=1 if p.recompute == "full" else None,
        )
    if p.fp8:
        rt.update(fp8=p.fp8, fp8_recipe=p.fp8_recipe)
    return rt


@dataclass
class Policy:
    """The trainable model as this rank holds it: model chunks (one per virtual stage) and optimizer."""

    cfg: Config
    chunks: list[torch.nn.Module]
    optimizer: Any = None
    scheduler: Any = None  # megatron's OptimizerParamScheduler: warmup, decay, per-group lr/wd multipliers
    config: Any = None
    step: int = 0
    head: str = "lm"  # lm (next-token logits) | scalar (a reward model's score per position)
    export_plan: Any = field(default=None, repr=False, compare=False)  # hf_bridge.export_hf's cached tasks


def build_policy(cfg: Config, with_optimizer: bool = True, head: str = "lm") -> Policy:
    config = model_lib.transformer_config(cfg.model, **runtime_config(cfg))
    use_te = use_transformer_engine(cfg.parallel.transformer_impl)
    if head == "scalar" and cfg.parallel.sequence_parallel:
        raise ConfigError(
            "a reward model does not support parallel.sequence_parallel yet: its scalar head reads "
            "whole sequences. Fix: set parallel.sequence_parallel=false."
        )
    model = (model_lib.build_reward_model if head == "scalar" else model_lib.build_gpt)(
        cfg.model,
        config,
        use_te,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.distributed_optimizer,
        bucket_size=None if p.overlap_grad_reduce else 2**62,
    )
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)]
    config.finalize_model_grads_func = finalize_model_grads
    if p.overlap_grad_reduce:
        config.no_sync_func = chunks[0].no_sync
        config.grad_sync_func = chunks[0].start_grad_sync
    policy = Policy(cfg=cfg, chunks=chunks, config=config, head=head)
    if with_optimizer:
        policy.optimizer = build_optimizer(cfg, chunks)
        policy.scheduler = build_scheduler(cfg, policy.optimizer)
        config.grad_scale_func = policy.optimizer.scale_loss
    return policy


def build_optimizer(cfg: Config, chunks: list[torch.nn.Module]):
    o, t = cfg.stage.train.optim, cfg.stage.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=t.dtype == "bf16",
        fp16=t.dtype == "fp16",
        params_dtype=DTYPES[t.dtype],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, chunks)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    o, steps = cfg.stage.train.optim, cfg.stage.train.steps
    if o.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(f"stage.train.optim.schedule={o.schedule!r}: expected cosine, linear or constant.")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(steps, o.warmup_steps + 1),
        lr_decay_style=o.schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
    )


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


@contextlib.contextmanager
def eval_mode(policy: Policy):
    """The policy's chunks in eval mode for a scoring pass, back in train mode afterwards."""
    for c in policy.chunks:
        c.eval()
    try:
        yield
    finally:
        for c in policy.chunks:
            c.train()


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


def from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """`t` as the last pipeline stage holds it, on every stage (in place): only that stage computes outputs."""
    torch.distributed.broadcast(
        t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
    )
    return t


def reduce_loss(data: list[dict]) -> float | None:
    """Global token-mean loss from the per-micro-batch [sum, count] pairs, summed over DP.

    Every rank returns the same value: the last pipeline stage reduces over DP and broadcasts it.
    """
    t = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in data:
            t += d["loss"].double().cpu()
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    from_last_stage(t)
    return float(t[0] / t[1]) if t[1] > 0 else None


def is_rank0() -> bool:
    """Whether this process writes the run's shared files (the only process when not distributed)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def all_ranks_true(flag: bool) -> bool:
    """The same answer on every rank: whether `flag` holds on all of them."""
    t = torch.tensor([0 if flag else 1])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return int(t) == 0


def reduce_sums(data: list[dict], keys: list[str]) -> dict[str, float]:
    """Per-micro-batch scalar sums → global sums over micro-batches and DP, the same on every rank."""
    t = torch.zeros(len(keys), dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in data:
            t += torch.stack([d[k].double().cpu().reshape(()) for k in keys])
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    from_last_stage(t)
    return dict(zip(keys, t.tolist()))


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [b, s, v/tp] → full [b, s, v]."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def data_parallel_rank() -> int:
    return ps.get_data_parallel_rank()


def data_parallel_size() -> int:
    return ps.get_data_parallel_world_size()


def gather_data_parallel(obj) -> list:
    """Every data-parallel rank's `obj`, in rank order (pickled; for small host-side results)."""
    if not torch.distributed.is_initialized() or data_parallel_size() == 1:
        return [obj]
    parts = [None] * data_parallel_size()
    torch.distributed.all_gather_object(parts, obj, group=ps.get_data_parallel_group())
    return parts


def split_for_data_parallel(items: Iterable, rank: int | None = None, size: int | None = None) -> list:
    """This DP rank's contiguous share of a global list of micro-batch rows."""
    items = list(items)
    rank = data_parallel_rank() if rank is None else rank
    size = data_parallel_size() if size is None else size
    if len(items) % size:
        raise ValueError(f"{len(items)} items do not split evenly over {size} data-parallel ranks")
    n = len(items) // size
    return items[rank * n : (rank + 1) * n]
