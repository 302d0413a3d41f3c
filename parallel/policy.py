"""The trainable model as this rank holds it: megatron model chunks for the configured layout, wrapped in
megatron's DDP, with the optimizer and LR/WD schedule."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from core import model as model_lib
from core.config import Config
from core.errors import ConfigError
from parallel.kernels import use_transformer_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        # RL micro-batches are cut to their longest row (core.data.trimmed_micro_batches): pipeline stages
        # exchange each one's shape instead of assuming seq_length.
        variable_seq_lengths=p.pipeline > 1,
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


def build_policy(
    cfg: Config, with_optimizer: bool = True, head: str = "lm", train_mtp: bool = True, routing_replay: bool = False
) -> Policy:
    """The model chunks this rank holds, wrapped for data parallelism, with the optimizer and LR schedule.

    train_mtp=False (the RL stages, whose forward skips them: core.model.without_mtp) keeps the
    multi-token-prediction layers' weights frozen, so weight decay does not move them either.
    routing_replay: MoE routers that can replay or record routes (parallel.routing_replay)."""
    extra = {"moe_enable_routing_replay": True} if routing_replay else {}
    config = model_lib.transformer_config(cfg.model, **runtime_config(cfg), **extra)
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
    if not train_mtp and getattr(model, "mtp_process", False):
        model.mtp.requires_grad_(False)
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


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
