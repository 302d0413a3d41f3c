"""Refit receipts: what an engine received in a weight update, checked before it reloads anything.

The sender computes a checksum per bucket; the engine's worker recomputes it on what arrived and refuses a
mismatch, naming the bucket and its tensors, and refuses a state that lacks a tensor the model was loaded
with. The loaded tensors themselves cannot be compared with the sent ones (vLLM's CPU path
re-packs weights on load), so this checks the boundary, and the post-refit probe (inference.colocated)
checks the result. Runs on both sides: the trainer's process and vLLM's worker.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Iterable

import torch

from inference.supervision import EngineError


class RefitError(EngineError):
    """A weight update that arrived damaged or incomplete: the engine keeps its previous weights."""


def checksum(t: torch.Tensor) -> int:
    """CRC-32 of the tensor's bytes, its dtype and shape (~1 GB/s on one CPU core)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data, zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode()))


def bucket_checksum(bucket: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Over the bucket's tensors in name order (safetensors hands them back sorted)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(bucket, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(checksum(t).to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little")


def verify_bucket(bucket: list[tuple[str, torch.Tensor]], expected: int, index: int) -> None:
    got = bucket_checksum(bucket)
    if got != expected:
        names = ", ".join(name for name, _ in bucket[:6]) + (" …" if len(bucket) > 6 else "")
        raise RefitError(
            f"weight update: bucket {index} ({len(bucket)} tensors: {names}) arrived with checksum {got:#x}, "
            f"sent with {expected:#x}; the engine keeps its previous weights. Fix: a damaged transfer; look "
            "for memory or transport errors in the log above."
        )


def verify_names(received: Iterable[str], expected: set[str] | None) -> None:
    """Every tensor the model was loaded with must be in the update (more may be: a tied head's copy)."""
    missing = sorted(set(expected or ()) - set(received))
    if missing:
        raise RefitError(
            f"weight update: the state sent lacks {len(missing)} tensor(s) the engine's model was loaded with "
            f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); a reload would leave them stale, "
            "silently, so none is loaded and the engine keeps its previous weights. Fix: send the full "
            "HF-named state (parallel.hf_bridge.export_hf) of the model the engine was started from."
        )


def checkpoint_names(model_dir: str | Path) -> set[str]:
    """The tensor names of an HF directory's safetensors files: the state a refit must send."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    return names
