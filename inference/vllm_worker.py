"""What runs on vLLM's worker: weight reloads and the re-packing of MoE experts after them.

Imported by the worker itself. An engine in a process of its own (VLLMEngine(own_process=True)) names
`WeightReceiver` as its worker extension: the trainer sends safetensors bytes bucket by bucket (tensors do
not cross a process boundary), and the last call reloads the whole state at once, as vLLM's
`reload_weights` wants it (the full HF-named state: with tied embeddings a partial reload leaves the logits
head on the old weights, silently).
"""

from __future__ import annotations

import logging
import time

from inference.vllm_routing import RoutingRecorder


class _RotaryReloadNotice(logging.Filter):
    # Every reload warns "RotaryEmbedding: Failed to load weights" (Llama3RotaryEmbedding, … for the
    # scaled kinds): its cos/sin cache is no checkpoint weight, and vLLM puts the cache back itself (the
    # sync tests compare logprobs after a reload).
    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class _MLAReloadNotice(logging.Filter):
    # MLA's absorbed matrices (W_UK_T, W_UV) are no checkpoint weights: vLLM derives them from kv_b_proj
    # after every reload, and warns at each sync that they "were not loaded from checkpoint". Other
    # missing weights still warn.
    DERIVED = ("W_UK_T", "W_UV", "W_UK_T_dcp_qrep")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Following weights were not loaded from checkpoint"):
            return True
        names = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (
            isinstance(names, (set, frozenset, list))
            and names
            and all(n.rsplit(".", 1)[-1] in self.DERIVED for n in names)
        )


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadNotice())
logging.getLogger("vllm.model_executor.model_loader.reload.inplace").addFilter(_MLAReloadNotice())


def repack_moe_experts(worker) -> int:
    """vLLM's CPU fused-MoE kernel packs expert weights once at load; a reload must re-pack them or the
    engine silently serves the old experts (logprob gap 0.4 after one reload, 2.5 after two)."""
    count = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)
            count += 1
    return count


class WeightReceiver:
    """Mixed into vLLM's worker class (worker_extension_cls): methods the trainer calls through
    collective_rpc. Each bucket is checked against the sender's checksum as it arrives, the whole state
    against the names the model was loaded with before anything is reloaded (inference.refit)."""

    def receive_weight_bucket(self, payload, expected: int, index: int) -> int:
        """`payload`: safetensors bytes (an engine-core process) or the (name, tensor) list (in-process)."""
        from inference.refit import verify_bucket

        if isinstance(payload, bytes):
            from safetensors.torch import load

            bucket = list(load(payload).items())
        else:
            bucket = list(payload)
        staged = self.__dict__.setdefault("_r1_staged", [])
        try:
            verify_bucket(bucket, expected, index)
        except Exception:
            staged.clear()  # a refused update leaves nothing behind for the next one
            raise
        staged.extend(bucket)
        return len(staged)

    def load_received_weights(self, expected_names=None) -> dict:
        """Reloads everything received since the last call once its names are the model's; returns the
        tensor count and the seconds of the reload and of the post-processing (MoE re-pack)."""
        from inference.refit import verify_names

        staged, self._r1_staged = self.__dict__.get("_r1_staged", []), []
        verify_names((name for name, _ in staged), set(expected_names) if expected_names else None)
        t0 = time.perf_counter()
        self.reload_weights(weights_iterator=iter(staged))
        t1 = time.perf_counter()
        repack_moe_experts(self)
        return {"tensors": len(staged), "load_s": t1 - t0, "post_s": time.perf_counter() - t1}


class Extension(WeightReceiver, RoutingRecorder):
    """The worker extension the engine names: weight reloads and the routing record (inference.vllm_routing)."""
