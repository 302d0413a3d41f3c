"""MoE routing replay (R3) on the trainer's side: the RL forward routes each token to the experts the engine
routed it to, or records its own routing to compare with the engine's.

megatron-core's routers carry a `RouterReplay` when the model is built with `moe_enable_routing_replay`: in
REPLAY_FORWARD it takes the top-k expert ids it is given instead of computing them (the gate weights are
still the current logits' for those experts, so the gradient flows through them), in RECORD it keeps the ids
it computed. Its global switches act on every such router of the process, so only the policy is built with
it (the KL reference and a teacher route by themselves) and this module drives the policy's routers one by
one. Routes come per micro-batch as [b, s, MoE layers, k] (the batch's "routed_experts", in the engine's
layer order) and go to each router as [s·b, k], sequence-major as the router flattens its input; under
sequence parallelism a rank's router sees its own slice of the sequence.

One pipeline stage (core.validate refuses more): 1F1B would run several micro-batches' forwards before
their backwards, and a recomputing backward would need the routes of its own micro-batch back.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from parallel.policy import unwrap


def routers(policy_or_model) -> list:
    """The RouterReplay of each decoder MoE layer (multi-token prediction's excluded), in layer order."""
    chunks = getattr(policy_or_model, "chunks", [policy_or_model])
    found = []
    for chunk in chunks:
        for name, module in unwrap(chunk).named_modules():
            if name.startswith("decoder.") and isinstance(module, TopKRouter) and module.router_replay is not None:
                found.append((module.layer_number, module.router_replay))
    return [replay for _, replay in sorted(found, key=lambda pair: pair[0])]


def route_mode(cfg) -> str | None:
    """What an RL run does with the engine's routes: "replay" them (stage.rl.routing_replay), "record" the
    policy's own to report the agreement (an MoE model on vLLM with rollout.consistency=topk), or None
    (then the engine records none)."""
    if not cfg.model.is_moe or cfg.rollout.engine != "vllm":
        return None
    if cfg.stage.rl.routing_replay:
        return "replay"
    return "record" if cfg.rollout.oracle else None


ACTIONS = {None: None, "replay": RouterReplayAction.REPLAY_FORWARD, "record": RouterReplayAction.RECORD}


@contextlib.contextmanager
def routing(policy, mode: str | None):
    """The policy's routers replay the routes fed to them ("replay") or record their own ("record") during
    the block; None: neither."""
    action = ACTIONS[mode]
    replays = routers(policy) if action is not None else []
    if action is not None and not replays:
        raise RuntimeError("routing replay needs a policy built with moe_enable_routing_replay (an MoE model)")
    for r in replays:
        r.clear_indices()
        r.set_router_replay_action(action)
    try:
        yield replays
    finally:
        for r in replays:
            r.clear_indices()
            r.clear_router_replay_action()


def _local(routes: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[b, s, ...] → this rank's rows as its routers see them: [s(/tp under sequence parallelism)·b, ...]."""
    b, s = routes.shape[:2]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1 and sequence_parallel:
        rank, part = ps.get_tensor_model_parallel_rank(), s // tp
        routes = routes[:, rank * part : (rank + 1) * part]
    return routes.transpose(0, 1).reshape(-1, *routes.shape[2:])


def feed(model, routes: torch.Tensor) -> None:
    """One micro-batch's routes [b, s, layers, k] to the model chunk's routers, before its forward."""
    replays = routers(model)
    if routes.shape[2] != len(replays):
        raise ValueError(
            f"the engine routed {routes.shape[2]} MoE layers and the policy has {len(replays)}: they are not "
            "the same model"
        )
    rows = _local(routes, unwrap(model).config.sequence_parallel).long()
    for layer, r in enumerate(replays):
        r.clear_indices()
        r.set_target_indices(rows[:, layer].contiguous())


def agreement(model, routes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """After a recording forward of the model chunk: per layer, how many of the positions in `mask` [b, s]
    it routed to the same set of experts as `routes` [b, s, layers, k] says. [layers] counts (float64)."""
    sequence_parallel = unwrap(model).config.sequence_parallel
    want, keep = _local(routes, sequence_parallel).long(), _local(mask, sequence_parallel) > 0
    counts = []
    for layer, r in enumerate(routers(model)):
        got = r.get_recorded_indices()
        same = (got.sort(-1).values == want[:, layer].sort(-1).values).all(-1)
        counts.append((same & keep).sum())
    counts = torch.stack(counts).double()
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:  # each rank routed its own slice
        torch.distributed.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
    return counts
