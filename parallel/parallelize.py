"""Process groups for the configured layout (torch.distributed and megatron's), and the collectives the
stages use over them. Every collective also works in a plain single process (no torch.distributed)."""

from __future__ import annotations

import datetime
import os
from typing import Iterable

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from core.config import Config
from core.validate import validate
from parallel import env as launch_env


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


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_rank0() -> bool:
    """Whether this process writes the run's shared files (the only process when not distributed)."""
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_world(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small host-side values)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def share_model_parallel(obj):
    """`obj` as the first rank of this rank's model-parallel group (tensor × pipeline) holds it, on every
    rank of that group: what one replica computes once (rollouts) and all its ranks must use."""
    group = ps.get_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(group, 0), group=group)
        return box[0]
    return obj


def max_over_world(values: list[float]) -> list[float]:
    """Each value's maximum over all ranks, the same on every rank."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX)
    return t.tolist()


def is_last_pipeline_stage() -> bool:
    """Whether this rank computes the model's outputs (log-probs, losses): the last pipeline stage."""
    return ps.is_pipeline_last_stage(ignore_virtual=True)


def leads_replica() -> bool:
    """Whether this rank is its model replica's first tensor- and pipeline-parallel rank: where one-per-replica
    work (the colocated engine, rollouts) runs."""
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def all_ranks_true(flag: bool) -> bool:
    """The same answer on every rank: whether `flag` holds on all of them."""
    t = torch.tensor([0 if flag else 1])
    # One process has no one to ask
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
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
