"""`python -m tools.bench logprobs`: per-token log-probs and entropy (GRPO's forward) at a DeepSeek-V3
vocabulary (129,280), the full-logits path vs the chunked one (parallel/logprobs.py), forward + backward
through a small model (hidden 256, 2 layers, fp32, TP1). Each case runs in a fresh process, so its peak
RSS (ru_maxrss) is its own.

    python -m tools.bench logprobs --out bench_logprobs.json [--threads 1]
    python -m tools.bench_logprobs chunked 8 4096 --threads 1   # one case, JSON on the last line
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 129_280
MODEL = [
    f"model.vocab_size={VOCAB}",
    "model.hidden_size=256",
    "model.ffn_hidden_size=768",
    "model.num_layers=2",
    "model.num_attention_heads=8",
    "model.max_position_embeddings=4096",
    "model.tie_word_embeddings=false",  # DeepSeek-V3's head is its own weight
    "logger=none",
]
# (path, batch, seq, steps): the full path only at 8 × 512, where its fp32 logits are 2.1 GB a copy;
# at 8 × 4096 they would be 17 GB a copy. The first step of a case includes its warm-up; seconds are the best.
CASES = [("naive", 8, 512, 2), ("chunked", 8, 512, 2), ("chunked", 8, 4096, 1)]
# The full path holds about seven logits-sized fp32 tensors at its peak (model output, its softmax,
# the entropy's temporaries); it is skipped, not run into the OOM killer, when memory is short.
NAIVE_COPIES = 7.5


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def case(path: str, b: int, s: int, steps: int, threads: int, chunk: int) -> dict:
    """One case in this process: build the model, run `steps` forward + backward passes."""
    import torch

    torch.set_num_threads(threads)
    import parallel  # noqa: F401  (CPU compatibility layer before megatron)
    from core import model as model_lib
    from core.compose import compose
    from core.data import causal_mask
    from parallel import parallelize
    from parallel.logprobs import LogprobRequest, head_logprobs, token_entropy, token_logprobs
    from parallel.policy import runtime_config

    cfg = compose(MODEL)
    parallelize.init_distributed(cfg)
    torch.manual_seed(0)
    model = model_lib.build_gpt(cfg.model, model_lib.transformer_config(cfg.model, **runtime_config(cfg)), False)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, VOCAB, (b, s + 1), generator=g)
    tokens, labels, mask = t[:, :-1], t[:, 1:], torch.ones(b, s)
    position_ids, attention_mask = torch.arange(s).expand(b, s), causal_mask(s)

    def forward():
        if path == "naive":  # what rlhf.grpo's forward step did before chunking
            logits = model(tokens, position_ids, attention_mask)
            return token_logprobs(logits, labels, VOCAB), token_entropy(logits, VOCAB)
        request = LogprobRequest(labels, VOCAB, 1.0, chunk)
        return model(
            tokens, position_ids, attention_mask, output_processor=head_logprobs, output_processor_context=request
        )

    base_rss, seconds = _rss_mb(), []
    for _ in range(steps):
        t0 = time.perf_counter()
        logp, ent = forward()
        (logp * mask).sum().backward()
        seconds.append(time.perf_counter() - t0)
        del logp, ent
        model.zero_grad(set_to_none=True)
    parallelize.shutdown()
    return {
        "path": path,
        "tokens": f"{b}x{s}",
        "chunk_tokens": chunk if path == "chunked" else None,
        "step_s": round(min(seconds), 2),
        "first_step_s": round(seconds[0], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_step_mb": round(base_rss),  # the model (no optimizer) and the batch
        "logits_fp32_mb": round(b * s * VOCAB * 4 / 2**20),
    }


def logprobs(args: argparse.Namespace) -> dict:
    from parallel.logprobs import CHUNK_TOKENS

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT), R1_NO_PROGRESS="1")
    figures: dict[str, dict] = {}
    for path, b, s, steps in CASES:
        key = f"{path}_{b}x{s}"
        need = NAIVE_COPIES * b * s * VOCAB * 4
        if path == "naive" and _mem_available() < need:
            figures[key] = {"skipped": f"needs ~{need / 2**30:.1f} GiB, {_mem_available() / 2**30:.1f} GiB available"}
            continue
        cmd = [sys.executable, "-m", "tools.bench_logprobs", path, b, s]
        cmd += ["--steps", steps, "--threads", args.threads, "--chunk", CHUNK_TOKENS]
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            figures[key] = {"failed": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
            continue
        figures[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["threads"] = args.threads
    naive, chunked = figures.get("naive_8x512", {}), figures.get("chunked_8x512", {})
    ratios = {}
    if "step_s" in naive and "step_s" in chunked:
        ratios["naive_over_chunked_peak_rss_8x512"] = round(naive["peak_rss_mb"] / chunked["peak_rss_mb"], 2)
        ratios["naive_over_chunked_step_s_8x512"] = round(naive["step_s"] / chunked["step_s"], 2)
    big = figures.get("chunked_8x4096", {})
    if "peak_rss_mb" in big:
        ratios["chunked_8x4096_peak_rss_over_one_fp32_logits"] = round(big["peak_rss_mb"] / big["logits_fp32_mb"], 3)
    return {"figures": figures, "ratios": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_logprobs", description=__doc__)
    parser.add_argument("path", choices=["naive", "chunked"])
    parser.add_argument("batch", type=int)
    parser.add_argument("seq", type=int)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: CHUNK_TOKENS)")
    a = parser.parse_args(argv)
    if a.chunk is None:
        from parallel.logprobs import CHUNK_TOKENS

        a.chunk = CHUNK_TOKENS
    print(json.dumps(case(a.path, a.batch, a.seq, a.steps, a.threads, a.chunk)))


if __name__ == "__main__":
    main()
