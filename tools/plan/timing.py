"""Step time: FLOPs through the pipeline (MLA, only the routed experts a token uses), tensor-parallel
collectives, expert all-to-all, pipeline bubble and p2p, data-parallel gradient sync, the optimizer
(on GPU or CPU), and for GRPO the vLLM generation, log-prob passes and the weight refit.

Every term is bytes over a bandwidth or FLOPs over a peak, scaled by the efficiencies in hardware.py; a
decode step adds DECODE_OVERHEAD_S per layer (launches and cross-node engine latency that tiny decode kernels
cannot hide; training kernels are long enough to hide theirs).
"""

from __future__ import annotations

import math

from core.config import Config
from tools.plan import hardware as hw
from tools.plan.arch import Arch, Stage
from tools.plan.hardware import GPU
from tools.plan.layout import Layout, Workload
from tools.plan.memory import GRAD_BYTES, OPTIM_BYTES, WEIGHT_BYTES, stage_params


def _link(gpu: GPU, L: Layout, span: int) -> float:
    return (gpu.ib_bw if L.inter_node(span) else gpu.nvlink_bw) * hw.BW_EFF


def _passes(recompute: str, backward: bool) -> tuple[float, float]:
    """(linear-FLOP multiplier, activation passes) of one micro-batch: forward 1, backward 2, recompute +1."""
    if not backward:
        return 1.0, 1.0
    return (4.0, 3.0) if recompute == "full" else (3.0, 2.0)


def stage_time(cfg: Config, a: Arch, s: Stage, L: Layout, gpu: GPU, tokens: float, ctx: float, backward: bool) -> dict:
    """Seconds one GPU of stage `s` spends on one micro-batch of `tokens` tokens, by term."""
    p = cfg.parallel
    mult, comm_passes = _passes(p.recompute, backward)
    kinds = list(s.kinds)
    lin = sum(a.linear_flops(k) for k in kinds) * tokens
    core = a.attn_core_flops(ctx) * len(kinds) * tokens
    head = 0.0
    if s.head:  # the output head is not recomputed; MTP runs only when training
        head = 2 * a.head_or_embed * tokens
        lin += (a.mtp_linear_flops() if backward else 0) * tokens
        core += (a.mtp * a.attn_core_flops(ctx) if backward else 0) * tokens
    if backward and p.recompute == "selective" and a.mla:  # MLA up-projections run again
        up = a.attn - a.h * (a.mla["q_lora"] + a.mla["kv_latent"]) - a.heads * a.v_dim * a.h
        lin += 2 * up * len(kinds) * tokens
    core_mult = 1 + (2.5 if backward else 0) + (1 if backward and p.recompute == "full" else 0)
    sm_share = 1 - (hw.DUALPIPE_COMM_SMS if L.dualpipe else 0)
    lin_peak = (gpu.fp8_flops if p.fp8 else gpu.bf16_flops) * hw.MATMUL_EFF * sm_share
    matmul = (lin * mult + head * (3 if backward else 1)) / L.tp / lin_peak
    attention = core * core_mult / L.tp / (gpu.bf16_flops * hw.MATMUL_EFF * sm_share)
    compute = matmul + attention

    n_layers = len(kinds) + (a.mtp if s.head and backward else 0)
    tp = 0.0
    if L.tp > 1:  # sequence parallel: all-gather + reduce-scatter around attention and around the MLP
        tp = n_layers * comm_passes * 4 * (L.tp - 1) / L.tp * tokens * a.h * 2 / _link(gpu, L, L.tp)
    ep = 0.0
    moe_layers = sum(k == "moe" for k in kinds) + (a.mtp if s.head and backward and a.experts else 0)
    if L.ep > 1 and moe_layers:
        per_gpu = tokens / L.tp
        width = a.h * ((1 if p.fp8 else 2) + 2)  # dispatch (FP8 when training in FP8) + bf16 combine
        nvl = per_gpu * a.topk * width * (L.ep - 1) / L.ep / (gpu.nvlink_bw * hw.BW_EFF)
        ib = 0.0
        if L.ep_nodes > 1:  # one copy per remote node a token's experts live on (node-deduplicated dispatch)
            n, limit = L.ep_nodes, cfg.model.moe_router_group_topk or a.topk
            remote = min(limit, n * (1 - (1 - 1 / n) ** a.topk)) * (n - 1) / n
            ib = per_gpu * remote * width / (gpu.ib_bw * hw.BW_EFF)
        ep = moe_layers * comm_passes * max(nvl, ib)
    p2p = 0.0
    if L.pp > 1:
        p2p = comm_passes * tokens / L.tp * a.h * 2 / _link(gpu, L, L.world // L.pp + 1)
    exposed = max(0.0, ep + p2p - compute) if L.dualpipe else ep + p2p
    return dict(
        matmul=matmul,
        attention=attention,
        tp_comm=tp,
        ep_comm=ep,
        pp_p2p=p2p,
        comm_hidden=ep + p2p - exposed,
        total=compute + tp + exposed,
    )


def pipeline_time(
    cfg: Config, a: Arch, L: Layout, gpu: GPU, micro_batches: int, tokens: float, ctx: float, backward: bool
) -> dict:
    """One pass of `micro_batches` micro-batches through the pipeline: the slowest stage sets the pace; the
    fill and drain (the bubble) cost one micro-batch per other stage (1F1B), or (PP/2 - 1) forward chunks
    under DualPipe."""
    per_stage = [stage_time(cfg, a, s, L, gpu, tokens, ctx, backward) for s in L.stages]
    if L.dualpipe:
        per_rank = [[per_stage[i], per_stage[L.pp - 1 - i]] for i in range(L.pp)]
        slow = max(per_rank, key=lambda pair: pair[0]["total"] + pair[1]["total"])
        t_mb = (slow[0]["total"] + slow[1]["total"]) / 2
        mult = _passes(cfg.parallel.recompute, backward)[0]
        bubble = (L.pp / 2 - 1) * t_mb / mult
        terms = {k: (slow[0][k] + slow[1][k]) / 2 * micro_batches for k in slow[0]}
    else:
        slow = max(per_stage, key=lambda t: t["total"])
        t_mb = slow["total"]
        bubble = sum(t["total"] for t in per_stage) - t_mb
        terms = {k: slow[k] * micro_batches for k in slow}
    terms["pp_bubble"] = bubble
    terms["total"] = micro_batches * t_mb + bubble
    return terms


def optimizer_time(cfg: Config, a: Arch, L: Layout, gpu: GPU) -> dict:
    """Gradient sync over data parallel and the Adam update of the worst pipeline rank."""
    p, pl = cfg.parallel, cfg.plan
    worst = max(range(L.pp), key=lambda r: sum(sum(stage_params(a, s, L)) for s in L.rank_stages(r)))
    dense = sum(stage_params(a, s, L)[0] for s in L.rank_stages(worst))
    expert = sum(stage_params(a, s, L)[1] for s in L.rank_stages(worst))
    sync = 0.0
    for n, group, span in ((dense, L.dp * L.cp, L.tp * L.cp * L.dp), (expert, L.edp, L.world // L.pp)):
        if group > 1 and n:  # reduce-scatter grads (+ all-gather weights) or all-reduce
            per = (GRAD_BYTES + WEIGHT_BYTES) if p.distributed_optimizer else 2 * GRAD_BYTES
            sync += n * per * (group - 1) / group / _link(gpu, L, span)
    exposed = 0.0 if p.overlap_grad_reduce else sync  # overlapped: bucketed under the backward pass
    shard = (dense / (L.dp * L.cp) + expert / L.edp) if p.distributed_optimizer else dense + expert
    on_gpu = shard * (1 - pl.optimizer_offload) * 2 * (OPTIM_BYTES + GRAD_BYTES) / (gpu.hbm_bw * hw.BW_EFF)
    cpu = shard * pl.optimizer_offload
    # CPU Adam streams fp32 weight, grad, m, v in and weight, m, v out (28 B) through host DRAM; the grads
    # come down and the bf16 weights go up over PCIe, overlapped with it.
    on_cpu = max(cpu * 28 / (gpu.host_bw * hw.BW_EFF), cpu * (GRAD_BYTES + WEIGHT_BYTES) / (gpu.pcie_bw * hw.BW_EFF))
    return dict(dp_sync=sync, dp_sync_exposed=exposed, optimizer=on_gpu + on_cpu, total=exposed + on_gpu + on_cpu)


def train_step(cfg: Config, a: Arch, L: Layout, gpu: GPU, w: Workload) -> dict:
    """One optimizer step over a mini-batch (pretrain: the global batch)."""
    m, tokens = w.micro_batches(L.dp, cfg.stage.train.micro_batch_size)
    pipe = pipeline_time(cfg, a, L, gpu, m, tokens, _ctx(w, tokens), backward=True)
    opt = optimizer_time(cfg, a, L, gpu)
    return dict(
        pipeline=pipe,
        dp_sync=opt["dp_sync"],
        dp_sync_exposed=opt["dp_sync_exposed"],
        optimizer=opt["optimizer"],
        micro_batches=m,
        total=pipe["total"] + opt["total"],
    )


def _ctx(w: Workload, tokens: float) -> float:
    """Mean attended positions: causal within each sequence (packed sequences do not see each other)."""
    return (min(w.seq, tokens) + 1) / 2


def generation_time(cfg: Config, a: Arch, gpu: GPU, w: Workload, gen_gpus: int, concurrent: int) -> dict:
    """vLLM decode for one RL step. Each engine (rollout TP ranks) holds samples/engines sequences; a step
    reads the dense weights, the experts its active tokens route to, and their KV cache. Synchronous RL waits
    for the longest sample (max_new_tokens decode steps, the batch thinning out); an off-policy rollout.mode keeps
    the engines full, so the steps are set by throughput."""
    pl = cfg.plan
    r = pl.rollout_tensor
    engines = max(1, gen_gpus // r)
    batch = math.ceil(w.samples / engines)
    live = max(1, min(batch, concurrent))
    work = batch * w.response  # decode token-steps per engine
    steps = work / live if cfg.rollout.lead else max(w.max_response, work / live)
    active = work / steps
    dense_bytes = WEIGHT_BYTES * a.non_expert_params()
    expert_bytes = WEIGHT_BYTES * a.moe_layers * a.experts * a.expert
    touched = 1 - (1 - a.topk / a.experts) ** active if a.experts else 0.0
    kv_per_token = a.kv_cache_bytes * a.layers / (r if a.kv_shards_with_tp else 1)
    ctx = w.prompt + w.response / 2
    mem = (dense_bytes / r + expert_bytes * touched / r + active * ctx * kv_per_token) / (gpu.hbm_bw * hw.BW_EFF)
    flops = active * (2 * a.active_params() + a.layers * a.attn_core_flops(ctx)) / r / (gpu.bf16_flops * hw.MATMUL_EFF)
    link = (gpu.ib_bw if r > (cfg.cluster.gpus_per_node or 8) else gpu.nvlink_bw) * hw.BW_EFF
    allreduce = 2 * a.layers * active * a.h * 2 * 2 * (r - 1) / r / link if r > 1 else 0.0
    host = hw.DECODE_OVERHEAD_S * a.layers
    step = max(mem, flops) + allreduce + host
    prefill = batch * w.prompt * 2 * a.active_params() / r / (gpu.bf16_flops * hw.MATMUL_EFF)
    return dict(
        decode_steps=steps,
        active_sequences=active,
        step_s=step,
        memory_s=mem * steps,
        allreduce_s=allreduce * steps,
        overhead_s=host * steps,
        prefill_s=prefill,
        total=steps * step + prefill,
    )


def refit_time(cfg: Config, a: Arch, L: Layout, gpu: GPU) -> float:
    """Training shards -> full tensors -> the engine's TP shards. Every node receives the whole bf16 model
    once over its NICs (bucketed gathers over PP/EP), then each engine rank copies its slice in HBM."""
    model = WEIGHT_BYTES * a.total_params()
    gather = model / (L.gpn * gpu.ib_bw * hw.BW_EFF) if L.world > L.gpn else model / (gpu.nvlink_bw * hw.BW_EFF * L.gpn)
    load = model / cfg.plan.rollout_tensor / (gpu.hbm_bw * hw.BW_EFF)
    return gather + load


def rl_step(
    cfg: Config,
    a: Arch,
    L: Layout,
    gpu: GPU,
    w: Workload,
    gen_gpus: int,
    concurrent: int,
    train_state_bytes: float,
    weights_bytes: float,
) -> dict:
    """One GRPO step: generation, log-prob passes, mini-batch updates, refit, and for colocation the trip of
    optimizer state (and with plan.param_offload the weights) to the CPU and back around generation."""
    pl = cfg.plan
    gen = generation_time(cfg, a, gpu, w, gen_gpus, concurrent)
    m, tokens = w.micro_batches(L.dp, cfg.stage.train.micro_batch_size)
    m_all = m * w.minibatches
    lp_one = pipeline_time(cfg, a, L, gpu, m_all, tokens, _ctx(w, tokens), backward=False)["total"]
    logprobs = w.logprob_passes * lp_one
    train = train_step(cfg, a, L, gpu, w)
    updates = w.minibatches * train["total"]
    pcie = gpu.pcie_bw * hw.BW_EFF
    offload = 0.0
    if cfg.rollout.mode == "sync":  # colocated: training state leaves the GPU around generation
        offload = 2 * train_state_bytes / pcie
    if pl.param_offload:  # policy weights up and down around each phase, the reference's up for its pass
        offload += (2 * 2 + (w.logprob_passes - 1)) * weights_bytes / pcie
    refit = refit_time(cfg, a, L, gpu)
    train_side = logprobs + updates + offload + refit
    total = max(gen["total"], train_side) if cfg.rollout.lead else gen["total"] + train_side
    return dict(
        generation=gen, logprobs=logprobs, train=train, updates=updates, offload=offload, refit=refit, total=total
    )
