"""Memory and step-time planner for a layout on a GPU cluster (`python -m tools.plan`, see __main__.py).

`plan(cfg)` takes the same composed and validated Config as `python -m rlhf.train` and returns a JSON-able
dict: per-GPU memory, step time by term, throughput and MFU. A layout that does not divide raises the
ConfigError of core.config.validate; one that does not fit raises PlanError; both name the field and a fix.
"""

from __future__ import annotations

from core.config import Config
from core.errors import ConfigError
from core.validate import validate
from tools.plan.arch import arch
from tools.plan.hardware import GPUS, calibration
from tools.plan.layout import layout, workload
from tools.plan.memory import GIB, capacity, rollout_memory, training_memory
from tools.plan.timing import rl_step, train_step


class PlanError(ConfigError):
    """A layout that divides but does not fit; the message names the field and the fix."""


def gpus(cfg: Config) -> tuple[int, int, int]:
    """(all GPUs, training GPUs, generation GPUs) of the job."""
    c = cfg.cluster
    total = c.gpus or (c.nodes * c.gpus_per_node if c.gpus_per_node else None)
    if not total:
        raise ConfigError("cluster.gpus is not set. Fix: pass cluster.gpus=N (all GPUs of the job).")
    if cfg.rollout.mode == "sync" or workload(cfg).kind != "grpo":  # sync: the engine beside the trainer
        return total, total, total
    gen = cfg.plan.rollout_gpus
    if not gen or gen >= total:
        raise ConfigError(
            f"rollout.mode={cfg.rollout.mode} generates on a pool of its own: it needs plan.rollout_gpus in "
            f"[1, {total - 1}] (out of cluster.gpus={total}). Fix: set plan.rollout_gpus, or rollout.mode=sync."
        )
    return total, total - gen, gen


def _check_plan(cfg: Config) -> None:
    pl = cfg.plan
    if pl.workload not in ("auto", "pretrain", "grpo"):
        raise ConfigError(f"plan.workload={pl.workload!r}: expected auto, pretrain or grpo.")
    if pl.schedule not in ("1f1b", "dualpipe"):
        raise ConfigError(f"plan.schedule={pl.schedule!r}: expected 1f1b or dualpipe.")
    if pl.schedule == "dualpipe" and cfg.parallel.pipeline % 2:
        raise ConfigError(
            f"plan.schedule=dualpipe needs an even parallel.pipeline, got {cfg.parallel.pipeline}. "
            "Fix: use an even pipeline size, or plan.schedule=1f1b."
        )
    if not 0 <= pl.optimizer_offload <= 1 or not 0 < pl.rollout_memory_fraction <= 1:
        raise ConfigError("plan.optimizer_offload must be in [0, 1] and plan.rollout_memory_fraction in (0, 1].")
    if pl.response_tokens is not None and pl.response_tokens > cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"plan.response_tokens={pl.response_tokens} (the mean) exceeds rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens} (the cap). Fix: raise the cap or lower the mean."
        )


def _check_rollout(cfg: Config, gen_gpus: int) -> None:
    r, heads = cfg.plan.rollout_tensor, cfg.model.num_attention_heads
    if r < 1 or heads % r or gen_gpus % r:
        raise ConfigError(
            f"plan.rollout_tensor={r} must divide model.num_attention_heads={heads} and the "
            f"{gen_gpus} generation GPUs. Fix: use a power of two up to {min(heads, gen_gpus)}."
        )


def _gib(x: float) -> float:
    return round(x / GIB, 2)


def _reject_memory(where: str, need: float, cap: float, gpu_key: str, items: dict, fixes: list[str]) -> None:
    big = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(items.items(), key=lambda kv: -kv[1])[:3])
    raise PlanError(
        f"{where} needs {_gib(need)} GiB per GPU but cluster.gpu={gpu_key} has {_gib(cap)} GiB usable "
        f"(largest: {big} GiB). Fix: {'; or '.join(fixes)}."
    )


def _training_fixes(cfg: Config, mem: dict) -> list[str]:
    p = cfg.parallel
    fixes = []
    if mem["activations"] > mem["optimizer"] and p.recompute != "full":
        fixes.append(f"parallel.recompute={'full' if p.recompute == 'selective' else 'selective'}")
    if not p.distributed_optimizer:
        fixes.append("parallel.distributed_optimizer=true")
    fixes.append("more model parallelism (parallel.expert, parallel.pipeline, parallel.tensor) on more cluster.gpus")
    if cfg.plan.optimizer_offload < 1:
        fixes.append("plan.optimizer_offload=1 (CPU Adam)")
    return fixes


def plan(cfg: Config) -> dict:
    _check_plan(cfg)
    total, train_gpus, gen_gpus = gpus(cfg)
    if cfg.cluster.gpu not in GPUS:
        raise ConfigError(
            f"cluster.gpu={cfg.cluster.gpu!r} is not in the planner's table. Fix: use one of {sorted(GPUS)}."
        )
    gpu = GPUS[cfg.cluster.gpu]
    validate(cfg, train_gpus)
    w = workload(cfg)
    if w.kind == "grpo":
        _check_rollout(cfg, gen_gpus)
    a, L = arch(cfg.model), layout(cfg, train_gpus)
    cap = capacity(gpu)

    mem = training_memory(cfg, a, L, w)
    items = {k: mem[k] for k in ("weights", "grads", "optimizer", "activations")}
    if mem["total"] > cap:
        _reject_memory(
            f"training (pipeline rank {mem['pipeline_rank']})",
            mem["total"],
            cap,
            cfg.cluster.gpu,
            items,
            _training_fixes(cfg, mem),
        )
    memory = {k: _gib(v) for k, v in items.items()}
    memory.update(
        optimizer_on_cpu=_gib(mem["optimizer_on_cpu"]),
        training_total=_gib(mem["total"]),
        params_per_gpu_b=round(mem["params"] / 1e9, 3),
        worst_pipeline_rank=mem["pipeline_rank"],
        in_flight_micro_batches=mem["in_flight_micro_batches"],
    )
    peak = mem["total"]
    out = dict(
        model=cfg.model.name,
        params_b=round(a.total_params() / 1e9, 1),
        active_params_b=round(a.active_params() / 1e9, 1),
    )
    if w.kind == "grpo":
        colocated = cfg.rollout.mode == "sync"
        rm = rollout_memory(cfg, a, w, gpu, mem if colocated else None)
        if rm["total"] > cap or rm["concurrent_sequences"] < 1:
            what = "generation (vLLM weights + KV cache" + (" + resident training weights)" if colocated else ")")
            need = max(rm["total"], rm["weights"] + w.seq * rm["kv_bytes_per_token"])
            parts = dict(vllm_weights=rm["weights"], kv_cache=rm["kv_cache"], training_weights=rm["training_resident"])
            fraction = "lower" if rm["total"] > cap else "raise"
            _reject_memory(
                what,
                need,
                cap,
                cfg.cluster.gpu,
                parts,
                ["raise plan.rollout_tensor", f"{fraction} plan.rollout_memory_fraction", "plan.param_offload=true"],
            )
        memory.update(
            rollout_weights=_gib(rm["weights"]),
            rollout_kv_cache=_gib(rm["kv_cache"]),
            rollout_training_resident=_gib(rm["training_resident"]),
            rollout_total=_gib(rm["total"]),
            rollout_concurrent_sequences=rm["concurrent_sequences"],
        )
        peak = max(peak, rm["total"]) if colocated else peak
        state = mem["grads"] + mem["optimizer"]
        t = rl_step(cfg, a, L, gpu, w, gen_gpus, rm["concurrent_sequences"], state, mem["weights"])
        out["time_s"] = _rl_times(t)
        updates_flops = w.tokens * a.token_flops(w.ctx) * 3
        out["throughput"] = dict(
            tokens_per_step=w.tokens,
            tokens_per_s_per_gpu=round(w.tokens / t["total"] / total, 2),
            train_mfu=round(updates_flops / (t["updates"] * train_gpus * gpu.bf16_flops), 4),  # as verl and NeMo-RL
        )
    else:
        t = train_step(cfg, a, L, gpu, w)
        out["time_s"] = _train_times(t)
        tps = w.tokens / t["total"] / total
        out["throughput"] = dict(
            tokens_per_step=w.tokens,
            tokens_per_s_per_gpu=round(tps, 1),
            mfu=round(tps * a.token_flops(w.ctx) * 3 / gpu.bf16_flops, 4),
            gpu_hours_per_trillion_tokens=round(1e12 / tps / 3600),
        )
    memory.update(peak=_gib(peak), capacity=_gib(cap), fits=True)
    out["memory_gib"] = memory
    out["cluster"] = dict(
        gpu=cfg.cluster.gpu,
        gpus=total,
        training_gpus=train_gpus,
        generation_gpus=gen_gpus,
        gpus_per_node=L.gpn,
        spec=gpu.as_dict(),
    )
    p = cfg.parallel
    out["layout"] = dict(
        tensor=L.tp,
        pipeline=L.pp,
        context=L.cp,
        expert=L.ep,
        expert_tensor=L.etp,
        data=L.dp,
        expert_data=L.edp,
        layers_per_stage=[len(s.kinds) for s in L.stages],
        schedule=cfg.plan.schedule,
        recompute=p.recompute,
        fp8=p.fp8,
    )
    out["workload"] = dict(
        kind=w.kind,
        samples=w.samples,
        prompt_tokens=w.prompt,
        response_tokens=w.response,
        max_response_tokens=w.max_response,
        minibatches=w.minibatches,
        micro_batch_tokens=w.micro_tokens,
        logprob_passes=w.logprob_passes,
    )
    out["calibration"] = calibration()
    return out


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def _train_times(t: dict) -> dict:
    pipe = t["pipeline"]
    return _round(
        dict(
            step=t["total"],
            matmul=pipe["matmul"],
            attention=pipe["attention"],
            tp_comm=pipe["tp_comm"],
            ep_comm=pipe["ep_comm"],
            comm_hidden=pipe["comm_hidden"],
            pp_bubble=pipe["pp_bubble"],
            pp_p2p=pipe["pp_p2p"],
            dp_sync=t["dp_sync"],
            dp_sync_exposed=t["dp_sync_exposed"],
            optimizer=t["optimizer"],
            micro_batches=t["micro_batches"],
        )
    )


def _rl_times(t: dict) -> dict:
    g = t["generation"]
    return _round(
        dict(
            step=t["total"],
            generation=g["total"],
            decode_steps=g["decode_steps"],
            decode_step=g["step_s"],
            logprobs=t["logprobs"],
            train=t["updates"],
            refit=t["refit"],
            offload=t["offload"],
            update=_train_times(t["train"]),
        )
    )
