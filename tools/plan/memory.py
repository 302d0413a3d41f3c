"""Per-GPU memory: training state (weights, grads, distributed-optimizer state), activations under the chosen
recompute, and for GRPO the colocated vLLM engine's weights and KV cache.

Bytes per parameter follow this repo's megatron setup (parallel/parallelize.py): bf16 weights, fp32 grad
buffer (grad_reduce_in_fp32), fp32 main weights + Adam moments (12 B) sharded over data parallel when the
distributed optimizer is on. Activations per token per layer are itemised below; recompute changes which
items are kept:
  none       every tensor the backward needs;
  selective  DeepSeek-V3's recompute (report §3.3.2; megatron recompute_modules layernorm, mla_up_proj,
             moe_act): norms, MLA up-projections and the SwiGLU output are recomputed, SwiGLU inputs and
             linear inputs are cached in FP8 when parallel.fp8 is set;
  full       only each layer's input (one layer's full set exists at a time during the recompute).
(parallel/parallelize.py still hands megatron its default selective list, core_attn only: passing the
DeepSeek list needs grouped-GEMM experts for moe_act, which the runtime does not enable yet.)
"""

from __future__ import annotations

from core.config import Config
from tools.plan.arch import Arch, Stage
from tools.plan.hardware import GPU, RESERVED_GIB
from tools.plan.layout import Layout, Workload

GIB = 2**30
OPTIM_BYTES = 12  # fp32 main weight + Adam m + v
GRAD_BYTES = 4
WEIGHT_BYTES = 2


def layer_activation_bytes(a: Arch, kind: str, recompute: str, fp8: bool) -> float:
    """Bytes kept for the backward per token of one layer, before the tensor/sequence-parallel split."""
    h, lin = a.h, (1 if fp8 else 2)  # `lin`: the input of a linear layer, which FP8 training caches in FP8
    if recompute == "full":
        return 2 * h
    sel = recompute == "selective"
    attn = 2 * h + (0 if sel else lin * h)  # residual (norm input), norm output
    if a.mla:
        attn += 2 * (a.mla["q_lora"] + a.mla["kv_latent"])  # latents: inputs of the up-projections
        if not sel:  # normed latents, then q, k (with rope) and v from the up-projections
            attn += lin * (a.mla["q_lora"] + a.mla["kv_latent"]) + 2 * a.heads * (2 * a.qk_dim + a.v_dim)
    else:
        attn += 2 * a.heads * 3 * a.qk_dim  # q, k, v (GQA stores fewer k/v; an upper bound)
    attn += 2 * a.heads * a.v_dim + (a.heads * a.v_dim if fp8 else 0) + 4 * a.heads  # core output (+FP8 copy), lse
    if kind == "dense":
        f = a.dense_mlp // (3 * h)
        mlp = 2 * h + (0 if sel else lin * h) + 2 * 2 * f + lin * f  # residual, norm out, fc1 out, act out
    else:
        f, fs = a.expert // (3 * h), a.shared // (3 * h)
        swiglu_in = lin if sel else 2
        mlp = 2 * h + (0 if sel else lin * h) + 4 * a.experts  # residual, norm out, router probabilities
        mlp += a.topk * (lin * h + swiglu_in * 2 * f)  # dispatched inputs, SwiGLU inputs
        mlp += 0 if sel else a.topk * (lin * f + 2 * h)  # SwiGLU outputs, expert outputs (for the combine)
        mlp += swiglu_in * 2 * fs + (0 if sel else lin * fs)  # shared expert
    return attn + mlp


def stage_params(a: Arch, s: Stage, L: Layout) -> tuple[float, float]:
    """(non-expert, expert) parameters one GPU of this stage holds."""
    dense = sum(a.layer_params(k)[0] for k in s.kinds) / L.tp
    expert = sum(a.layer_params(k)[1] for k in s.kinds) / (L.ep * L.etp)
    if s.embed:
        dense += a.embed / L.tp
    if s.head:
        dense += (a.head + a.h) / L.tp
        if a.mtp:
            dense += a.mtp * (a.layer_params(a.mtp_kind)[0] + a.mtp_proj) / L.tp
            expert += a.mtp * a.layer_params(a.mtp_kind)[1] / (L.ep * L.etp)
    return dense, expert


def stage_activation_bytes(cfg: Config, a: Arch, s: Stage, L: Layout, tokens: float) -> tuple[float, float]:
    """(bytes kept per in-flight micro-batch, transient peak while one micro-batch runs) for one stage."""
    p = cfg.parallel
    fp8 = bool(p.fp8)
    kinds = list(s.kinds) + ([a.mtp_kind] * a.mtp if s.head else [])
    per_token = sum(layer_activation_bytes(a, k, p.recompute, fp8) for k in kinds)
    if p.sequence_parallel or L.tp == 1:  # sequence parallel (MLA and MoE with TP require it) splits it all
        kept = per_token * tokens / (L.tp * L.cp)
    else:  # without it the residuals and norm outputs (~4h bytes per layer) are whole on every TP rank
        whole = min(per_token, 4 * a.h * len(kinds))
        kept = (whole + (per_token - whole) / L.tp) * tokens / L.cp
    shard = L.tp * L.cp
    transient = 0.0
    if p.recompute == "full" and kinds:  # one layer re-materialised at a time
        transient += max(layer_activation_bytes(a, k, "none", fp8) for k in kinds) * tokens / shard
    if s.head:  # bf16 logits and their fp32 softmax for the vocab-parallel loss, per head (main + MTP)
        transient += (1 + a.mtp) * tokens * a.vocab / L.tp * 6
    return kept, transient


def training_memory(cfg: Config, a: Arch, L: Layout, w: Workload) -> dict:
    """The worst pipeline rank's training-phase memory, in bytes, itemised."""
    p, pl = cfg.parallel, cfg.plan
    micro_batches, _ = w.micro_batches(L.dp, cfg.stage.train.micro_batch_size)
    shard_d = L.dp * L.cp if p.distributed_optimizer else 1
    shard_e = L.edp if p.distributed_optimizer else 1
    worst = None
    for r in range(L.pp):
        held = L.rank_stages(r)
        dense = sum(stage_params(a, s, L)[0] for s in held)
        expert = sum(stage_params(a, s, L)[1] for s in held)
        optimizer = OPTIM_BYTES * (dense / shard_d + expert / shard_e)
        acts = [stage_activation_bytes(cfg, a, s, L, w.micro_tokens) for s in held]
        kept = sum(k for k, _ in acts) / len(acts)
        in_flight = min(L.pp + 1 if L.dualpipe else L.pp - r, micro_batches)
        row = dict(
            pipeline_rank=r,
            params=dense + expert,
            weights=WEIGHT_BYTES * (dense + expert),
            grads=GRAD_BYTES * (dense + expert),
            optimizer=optimizer * (1 - pl.optimizer_offload),
            optimizer_on_cpu=optimizer * pl.optimizer_offload,
            activations=kept * in_flight + max(t for _, t in acts),
            in_flight_micro_batches=in_flight,
        )
        row["total"] = row["weights"] + row["grads"] + row["optimizer"] + row["activations"]
        if worst is None or row["total"] > worst["total"]:
            worst = row
    return worst


def rollout_memory(cfg: Config, a: Arch, w: Workload, gpu: GPU, train: dict | None) -> dict:
    """vLLM's share of a generation GPU: its weights (TP-sharded, MTP not loaded) and the KV cache it reserves,
    plus what training leaves resident when colocated (weights unless plan.param_offload; grads and optimizer
    state wait on the CPU, as NeMo-RL and verl do)."""
    pl = cfg.plan
    weights = WEIGHT_BYTES * a.engine_params() / pl.rollout_tensor
    budget = pl.rollout_memory_fraction * gpu.hbm_gib * GIB
    workspace = 1 * GIB  # activations and sampling buffers of a decode step
    kv_per_token = a.kv_cache_bytes * a.layers / (pl.rollout_tensor if a.kv_shards_with_tp else 1)
    kv_reserved = max(0.0, budget - weights - workspace)
    resident = 0.0 if (train is None or pl.param_offload) else train["weights"]
    return dict(
        weights=weights,
        kv_cache=kv_reserved,
        kv_bytes_per_token=kv_per_token,
        concurrent_sequences=int(kv_reserved // (kv_per_token * w.seq)) if kv_per_token else 0,
        training_resident=resident,
        total=weights + kv_reserved + workspace + resident,
    )


def capacity(gpu: GPU) -> float:
    return (gpu.hbm_gib - RESERVED_GIB) * GIB
