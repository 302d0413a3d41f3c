"""HF <-> megatron conversion (parallel.hf_bridge) checked against transformers, at one layout.

    python tests/dist/hf_bridge_worker.py OUT.json CASE...                 (single process)
    torchrun --nproc-per-node 2 tests/dist/hf_bridge_worker.py OUT.json CASE...

Per case: build the policy; NaN-fill every param/persistent buffer; import a random tiny HF model (same
seed on every rank) through hf_bridge; logits vs transformers (fp32); export_hf vs the HF state dict.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import parallel  # noqa: E402,F401
from core.compose import compose  # noqa: E402
from core.hf_config import hf_config  # noqa: E402
from core.data import causal_mask  # noqa: E402
from parallel import hf_bridge  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from parallel.policy import build_policy, unwrap
from parallel.step import forward_backward, gather_logits

CASES = {
    "dense": ("tiny_dense", []),
    "dense_vocab100": ("tiny_dense", ["model.vocab_size=100"]),
    "dsv3": ("tiny_dsv3", []),
    "dense_tp2": ("tiny_dense", ["parallel.tensor=2"]),
    "dense_pp2": ("tiny_dense", ["parallel.pipeline=2"]),
    "dsv3_tp2_sp": ("tiny_dsv3", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "dsv3_ep2": ("tiny_dsv3", ["parallel.expert=2", "stage.train.micro_batch_size=1"]),
}


def random_hf_model(m, seed: int = 0):
    """(HF model, eval/fp32, eager attention; its checkpoint-layout state dict), identical on every rank."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    cfg = hf_config(m)
    torch.manual_seed(seed)
    cls = getattr(transformers, cfg.architectures[0])
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every tensor distinct and non-trivial (norms not all ones, biases not zero)
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    # transformers 5 fuses MoE experts in memory; checkpoints (and vLLM) keep them per expert
    state = revert_weight_conversion(model, dict(model.state_dict()))
    return model, {k: v.detach().clone() for k, v in state.items()}


def tensors(policy):
    for c in policy.chunks:
        model = unwrap(c)
        yield from model.named_parameters()
        yield from ((n, b) for n, b in model.named_buffers() if n.endswith("expert_bias"))


def logits_forward(batch, model):
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    return out, lambda o: (o.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": gather_logits(o).detach()})


def _max_all_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def run_case(name: str, save_dir: Path | None = None) -> dict:
    model_name, overrides = CASES[name]
    cfg = compose([f"model={model_name}", "logger=none", *overrides])
    P.shutdown_model_parallel()
    P.init_distributed(cfg)
    policy = build_policy(cfg, with_optimizer=False)
    m = cfg.model
    hf_model, hf_state = random_hf_model(m)

    with torch.no_grad():
        for _, t in tensors(policy):
            t.fill_(float("nan"))
    t0 = time.perf_counter()
    hf_bridge.import_hf_state(policy, hf_state)
    import_s = time.perf_counter() - t0
    # transformers' DeepseekV3 has no MTP module, so an in-memory HF model has no MTP weights
    never_written = sorted(n for n, t in tensors(policy) if torch.isnan(t).any() and ".mtp." not in f".{n}")
    with torch.no_grad():
        for n, t in tensors(policy):
            if torch.isnan(t).any():
                t.copy_(0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3)))

    b, s = 2, 16
    tokens = torch.randint(0, m.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))
    mb = dict(tokens=tokens, position_ids=torch.arange(s).expand(b, s), attention_mask=causal_mask(s))
    for c in policy.chunks:
        c.eval()
    with torch.no_grad():
        data = forward_backward(policy, [mb], forward_only=True, forward=logits_forward)
        ref = hf_model(tokens).logits.float()
    diff = float((data[0]["logits"][..., : m.vocab_size].float() - ref).abs().max()) if data else 0.0

    t0 = time.perf_counter()
    exported = dict(hf_bridge.export_hf(policy))
    export_s = time.perf_counter() - t0
    missing = sorted(set(hf_state) - set(exported))
    extra = sorted(k for k in set(exported) - set(hf_state) if int(k.split(".")[2]) < m.num_layers)
    shape = sorted(k for k in hf_state if k in exported and exported[k].shape != hf_state[k].shape)
    export_diff = max((float((exported[k] - hf_state[k]).abs().max()) for k in hf_state
                       if k in exported and k not in shape), default=float("nan"))
    result = {}
    if save_dir is not None:  # save_hf -> transformers loads it; import_hf restores every tensor (MTP included)
        import transformers

        hf_bridge.save_hf(policy, save_dir / name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(save_dir / name, attn_implementation="eager").eval()
        with torch.no_grad():
            result["saved_logits_max_diff"] = float((loaded(tokens).logits.float() - ref).abs().max())
        before = {n: t.detach().clone() for n, t in tensors(policy)}
        with torch.no_grad():
            for _, t in tensors(policy):
                t.fill_(float("nan"))
        hf_bridge.import_hf(policy, save_dir / name)
        result["reimport_max_diff"] = max(float("inf") if torch.isnan(t).any() else float((t - before[n]).abs().max())
                                          for n, t in tensors(policy))
    result["export_plan_follows_weights"] = _export_follows_weights(policy)
    return dict(case=name, world=torch.distributed.get_world_size(), never_written=never_written, **result,
                logits_max_diff=_max_all_ranks(diff), logits_scale=float(ref.abs().max()),
                export_max_diff=_max_all_ranks(export_diff), export_missing=missing, export_extra=extra,
                export_shape_mismatch=shape, n_exported=len(exported), n_hf=len(hf_state),
                has_lm_head="lm_head.weight" in exported, import_s=import_s, export_s=export_s)


def _export_follows_weights(policy) -> bool:
    """export_hf reuses its conversion plan across calls: it must see in-place updates (an optimizer
    step) and tensors replaced by new ones (which rebuilds the plan)."""
    before = {k: v.clone() for k, v in hf_bridge.export_hf(policy)}  # exported tensors may alias the weights
    with torch.no_grad():
        for _, t in tensors(policy):
            t.mul_(2)
    doubled = {k: v.clone() for k, v in hf_bridge.export_hf(policy)}
    for c in policy.chunks:
        for module in unwrap(c).modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None:
                        store[name] = torch.nn.Parameter(t.data * 0.5) if store is module._parameters else t * 0.5
    halved = dict(hf_bridge.export_hf(policy))
    return all(torch.equal(doubled[k], 2 * v) and torch.equal(halved[k], v) for k, v in before.items())


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    single = int(__import__("os").environ.get("WORLD_SIZE", "1")) == 1
    results = [run_case(name, out.parent if single else None) for name in sys.argv[2:]]
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    P.shutdown()


if __name__ == "__main__":
    main()
