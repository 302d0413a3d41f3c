"""The one place that chooses optional GPU kernels: Transformer Engine, apex, DALI.

Each is imported lazily and only where it is present; the CPU path uses megatron's local spec,
torch's RMSNorm and torch's AdamW, which megatron-core falls back to by itself when apex is absent.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def use_transformer_engine(impl: str = "auto") -> bool:
    if impl == "local":
        return False
    has_te = torch.cuda.is_available() and available("transformer_engine")
    if impl == "transformer_engine" and not has_te:
        raise RuntimeError(
            "parallel.transformer_impl=transformer_engine needs a CUDA GPU and the transformer-engine "
            "package (R1_EXTRAS=gpu make setup). Fix: set parallel.transformer_impl=local or auto."
        )
    return has_te if impl == "auto" else True


def apex_fused() -> bool:
    """apex's fused Adam/LayerNorm are used when importable (NGC containers); PyPI's 'apex' is unrelated."""
    return torch.cuda.is_available() and available("apex") and available("amp_C")


def summary() -> dict[str, bool]:
    return {
        "cuda": torch.cuda.is_available(),
        "transformer_engine": use_transformer_engine("auto"),
        "apex": apex_fused(),
        "dali": available("nvidia.dali") if available("nvidia") else False,
    }
