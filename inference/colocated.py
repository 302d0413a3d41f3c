"""The rollout engine colocated with the trainer: one per model replica, on its first tensor- and
pipeline-parallel rank, started from an HF export of the policy and kept in step with it.

In the colocated sync mode the engine and the trainer take turns with the accelerator's memory, in vLLM's
own order: `rest` (engine.sleep: KV cache freed, weights offloaded) once a step's generation is done,
`sync` wakes the weights, sends the policy's, then wakes the KV cache. vLLM has no sleep mode on CPU:
there both are no-ops (logged once).
"""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.ledger import phase
from inference.engine import Engine, build_engine
from parallel import hf_bridge
from parallel import parallelize as P
from parallel.routing_replay import route_mode
from parallel.weight_sync import sync_weights


def hosts_engine() -> bool:
    """Whether this rank hosts its replica's engine: the first tensor- and pipeline-parallel rank."""
    return P.leads_replica()


def start_engine(cfg: Config, policy, hf_dir: Path, tok) -> Engine | None:
    """The engine of this rank's replica (None on the ranks that host none), serving the policy's current
    weights: exported to `hf_dir` with the tokenizer, then loaded by rollout.engine."""
    hf_bridge.save_hf(policy, hf_dir, tokenizer=tok)  # collective (the export gathers shards); rank 0 writes
    P.barrier()  # every replica's engine loads rank 0's files: none may start before they are complete
    if not hosts_engine():
        return None
    r = cfg.rollout
    engine = build_engine(
        r.engine,
        model_dir=str(hf_dir),
        max_model_len=cfg.stage.train.seq_length,
        kv_cache_bytes=r.kv_cache_bytes,
        seed=cfg.seed,
        overlong_prompt=r.overlong_prompt,
        timeout_s=r.timeout_s,
        # A process of its own for generation beside training (rlhf.producer), and beside a world of several
        # trainer ranks: in-process, vLLM builds its groups over the trainer's torch.distributed world, a
        # collective the ranks without an engine never join (a hang at start-up).
        **({"own_process": True} if r.mode != "sync" or P.world_size() > 1 else {}),
        **({"max_logprobs": r.top_logprobs} if r.top_logprobs else {}),  # the mismatch oracle's top-k
        **({"record_routing": True} if route_mode(cfg) else {}),  # MoE routing replay or agreement
    )
    # Lets a dead engine restart mid-run with the trainer's weights, which only a synchronous engine serves
    if cfg.parallel.unsharded and r.mode == "sync":  # (and only unsharded, the export being local then)
        engine.weights_source = lambda: hf_bridge.export_hf(policy)
    return engine


@phase("generation")  # the engine releasing what it generated with
def rest(engine: Engine | None) -> None:
    """After a step's generation: the engine's memory goes to the trainer until the next sync."""
    if engine is not None:
        engine.sleep()


def sync(policy, engine: Engine | None, bucket_bytes: int) -> dict:
    """Collective (every rank exports): the policy's weights to the engine, woken around the update."""
    with phase("sync_load"):  # the engine's own time; sync_weights times the export and buckets apart
        if engine is not None:
            engine.wake_up(tags=["weights"])
        stats = sync_weights(policy, engine, bucket_bytes)
        if engine is not None:
            engine.wake_up(tags=["kv_cache"])
    return stats
