"""`python -m tools.bench train_mfu [overrides]`: megatron training steps of one config on this machine's
device (CUDA when there is one, else CPU), as model-FLOP utilization against the same device's measured
matmul peak (bf16 on a GPU, fp32 on a CPU), in the same run.

    python -m tools.bench train_mfu --out mfu.json model=qwen2_5_1_5b stage.train.seq_length=2048 \\
        stage.train.micro_batch_size=2 stage.train.global_batch_size=8      # tools/gpu_check.sh's

Random tokens at full length (no padding): every step trains global_batch_size × seq_length tokens.
"""

from __future__ import annotations

import statistics
import time


def matmul_peak(device: str, dtype, n: int, seconds: float = 2.0) -> float:
    """Best FLOP/s of an n×n matmul on `device` (the roofline that MFU is measured against)."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            torch.mm(a, b)
        _sync(device)
        best = max(best, (4 if device == "cuda" else 1) * 2 * n**3 / (time.perf_counter() - t0))
    return best


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def forward_flops(matmul_params: int, layers: int, hidden: int, tokens: float, squares: float) -> float:
    """Model FLOPs of one forward pass: 2 per matmul parameter per token, plus causal attention,
    2·layers·hidden·L² per length-L sequence (QKᵀ and AV over the L(L+1)/2 visible pairs). A trained
    token costs 3× (forward, and backward for inputs and weights)."""
    return 2 * matmul_params * tokens + 2 * layers * hidden * squares


def matmul_parameters(policy, vocab: int, hidden: int) -> int:
    """Parameters that multiply a token's activations: all but the input embedding (a lookup), plus the
    output head's vocab × hidden once (tied or not)."""
    total, embedding = 0, 0
    for name, p in policy.chunks[0].named_parameters():
        total += p.numel()
        if "embedding.word_embeddings" in name:
            embedding += p.numel()
        if "output_layer" in name:
            total -= p.numel()  # counted below, once
    return total - embedding + vocab * hidden


def train_mfu(args) -> dict:
    import torch

    import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
    from core.compose import compose
    from core.data import random_lm_micro_batch
    from parallel import parallelize as P
    from parallel.policy import build_policy
    from parallel.step import train_step

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = ["stage.train.dtype=bf16"] if cuda else []
    cfg = compose(["stage=pretrain", "logger=none", *dtype, *args.overrides])
    t, m = cfg.stage.train, cfg.model
    P.init_distributed(cfg)
    try:
        policy = build_policy(cfg)
        b, s = t.micro_batch_size, t.seq_length
        gen = torch.Generator().manual_seed(cfg.seed)

        def micro_batches() -> list[dict]:
            return [random_lm_micro_batch(b, s, m.vocab_size, gen) for _ in range(t.global_batch_size // b)]

        times, losses = [], []
        for i in range(args.steps + 2):  # two warm-up steps: allocator, kernels' autotuning
            batch = micro_batches()
            _sync(device)
            t0 = time.perf_counter()
            losses.append(train_step(policy, batch)["loss"])
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        params = matmul_parameters(policy, m.vocab_size, m.hidden_size)
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    finally:
        P.shutdown()
    tokens = t.global_batch_size * s
    flops = 3 * forward_flops(params, m.num_layers, m.hidden_size, tokens, t.global_batch_size * s * s)
    step_s = statistics.median(times)
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024)
    return {
        "figures": {
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({args.threads} threads)",
            "model": m.name,
            "dtype": t.dtype,
            "matmul_params": params,
            "tokens_per_step": tokens,
            "micro_batch_size": b,
            "seq_length": s,
            "median_step_s": step_s,
            "step_s": times,
            "losses": losses,
            "tokens_per_s": tokens / step_s,
            "model_flops_per_step": flops,
            "matmul_peak_flops_per_s": peak,
            "max_memory_gib": memory,
        },
        "ratios": {"train_mfu": flops / step_s / peak},
    }
