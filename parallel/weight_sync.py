"""Trainer → colocated engine: Megatron shards gathered over TP/EP/PP into full HF-named tensors,
grouped into buckets of `bucket_bytes`, handed to the engine, prefix cache reset by the engine.

The full state is always sent: with tied embeddings, a reload without lm_head.weight leaves vLLM's logits
head on the old weights, silently. export_hf is
collective, so every rank runs this; only ranks that host an engine pass one.
"""

from __future__ import annotations

import time

from core.ledger import timed
from inference.engine import buckets
from parallel.hf_bridge import export_hf


def sync_weights(policy, engine, bucket_bytes: int) -> dict:
    """Sends the policy's weights to `engine` (None on ranks without one); returns timing and volume."""
    t0 = time.perf_counter()
    stats = {"tensors": 0, "bytes": 0, "buckets": 0}

    def stream():
        exported = timed(export_hf(policy), "sync_export")
        for bucket in timed(buckets(exported, bucket_bytes), "sync_transfer"):
            stats["buckets"] += 1
            for name, t in bucket:
                stats["tensors"] += 1
                stats["bytes"] += t.numel() * t.element_size()
                yield name, t

    receipt = None
    if engine is None:
        for _ in stream():  # the gathers are collective: take part, keep nothing
            pass
    else:
        receipt = engine.update_weights(stream())  # under the engine's own watch (inference.engine.Engine)
    return {**stats, "seconds": time.perf_counter() - t0, "receipt": receipt or {}}
