"""MoE routing replay (R3) end to end on tiny_dsv3: vLLM records the experts it routes each token to
(inference.vllm_routing), the trainer records its own or replays the engine's (parallel.routing_replay).

    python tests/dist/routing_replay_worker.py OUT.json                                   (EP1, one process)
    python -m torch.distributed.run --nproc-per-node 2 tests/dist/routing_replay_worker.py OUT.json parallel=ep2

Rank 0 hosts the engine (fp32, whole-vocabulary top log-probs) and shares its samples; every rank scores its
data-parallel share. Measured, as a GRPO step sees them (rlhf.grpo.scoring_pass, rlhf.consistency.oracle):
1. the engine serves the trainer's weights: the trainer's own routing agrees with the recorded one per layer
   (which also proves the record maps each request's rows and positions right), and the KL is fp32's floor;
2. the engine's router bias is moved (its experts per token change, its gate weights do not: noaux_tc
   weighs the chosen experts by the unbiased scores): without replay the agreement and the KL show it; with
   replay the trainer routes as the engine did and the KL falls back to the floor;
3. an on-policy update replaying those routes gives the same old log-probs as the replaying scoring pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import parallel  # noqa: E402,F401
from core.compose import compose  # noqa: E402
from parallel import hf_bridge  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from parallel.policy import build_policy  # noqa: E402

PROMPTS = [[1, 64, 36, 22, 35, 85, 9, 80], [1, 10, 44, 36, 7]]
NEW_TOKENS = 10


def _move_router_bias(worker, scale: float) -> int:
    """On the vLLM worker: adds seeded noise to every MoE router's expert bias (in place, where the router
    reads it); returns how many it moved."""
    g = torch.Generator().manual_seed(7)
    moved = 0
    for name, t in [*worker.model_runner.model.named_parameters(), *worker.model_runner.model.named_buffers()]:
        if name.endswith("e_score_correction_bias"):
            t.data.add_(scale * torch.randn(t.shape, generator=g).to(t.dtype))
            moved += 1
    return moved


def _samples(engine, sampling):
    from rlhf.rollout import Sample

    out = engine.generate(PROMPTS, sampling) if engine is not None else None
    if out is not None:
        out = [
            Sample({"prompt": str(i)}, p, c.token_ids, c.logprobs, c.finish_reason, top_ids=c.top_ids,
                   top_logprobs=c.top_logprobs, routed_experts=c.routed_experts)
            for i, (p, comps) in enumerate(zip(out.prompts, out.completions)) for c in comps
        ]
    box = [out]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    return P.split_for_data_parallel(box[0])


def measure(policy, samples, routes: str) -> dict:
    from rlhf import consistency, grpo
    from rlhf.rollout import RolloutBatch

    batch = RolloutBatch.of([samples], max(map(len, PROMPTS)) + NEW_TOKENS, pad_id=0)
    scored = grpo.scoring_pass(policy, batch.tensors(), 4, 1.0, oracle=True, routes=routes)
    batch.old_logp, batch.trainer_top_logp = scored.logp, scored.top_logp
    row = consistency.oracle(batch, policy.cfg.model.vocab_size, NEW_TOKENS, max_kl=0.0, step=0)
    return {"kl_mean": row["consistency/kl_mean"], "kl_max": row["consistency/kl_max"],
            "tv_max": row["consistency/tv_max"], "agreement": scored.route_agreement, "batch": batch}


def main() -> None:
    torch.set_num_threads(1)  # before vLLM starts: its CPU worker freezes the thread count
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # _move_router_bias crosses to an engine process
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = compose(["model=tiny_dsv3", "logger=none", "stage.train.optim.lr=0.01",
                   "stage.train.optim.schedule=constant", "stage.rl.routing_replay=true", "stage.train.micro_batch_size=4", *overrides])
    P.init_distributed(cfg)
    policy = build_policy(cfg, train_mtp=False, routing_replay=True)
    workdir = Path(tempfile.mkdtemp(prefix="routing_replay_"))
    hf_bridge.save_hf(policy, workdir / "init")
    P.barrier()
    from inference.engine import Sampling, build_engine

    engine = None
    if P.rank() == 0:
        # Beside a torch.distributed world of several ranks the engine needs a process of its own: in-process,
        # vLLM would build its groups over that world, a collective the other ranks never join.
        engine = build_engine("vllm", model_dir=str(workdir / "init"), max_model_len=64, kv_cache_bytes=64 * 2**20,
                              timeout_s=300, max_logprobs=-1, record_routing=True, own_process=P.world_size() > 1)
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=1234, top_logprobs=-1)
    result = {"world": P.world_size(), "overrides": overrides}
    try:
        samples = _samples(engine, sampling)
        result["moe_layers"] = engine.moe_layers if engine is not None else None
        result["route_shape"] = list(samples[0].routed_experts.shape)
        same = {k: v for k, v in measure(policy, samples, "record").items() if k != "batch"}
        result["served"] = same  # the engine serves the trainer's weights and routes alike

        moved = engine.llm.collective_rpc(_move_router_bias, args=(0.05,))[0] if engine is not None else 0
        result["biases_moved"] = moved
        samples = _samples(engine, dataclasses.replace(sampling, seed=99))
        result["moved_record"] = {k: v for k, v in measure(policy, samples, "record").items() if k != "batch"}
        replayed = measure(policy, samples, "replay")
        result["moved_replay"] = {k: v for k, v in replayed.items() if k != "batch"}

        from rlhf import grpo
        from rlhf.losses import LossSettings

        batch = replayed["batch"]
        old = batch.old_logp
        batch.old_logp = None
        batch.advantages = torch.randn(batch.tokens.shape[0], 1).expand_as(batch.loss_mask).contiguous()
        settings = LossSettings(loss_agg="token_mean", eps_low=0.2, eps_high=0.2, kl="none", kl_coef=0.0,
                                max_len=NEW_TOKENS)
        stats = grpo.update(policy, batch.tensors(), settings, 1, 4, 1.0, routes="replay")
        mask = batch.loss_mask > 0
        gap = float((stats["old_logp"] - old)[mask].abs().max()) if P.is_last_pipeline_stage() else 0.0
        result["update"] = {"old_logp_gap": P.max_over_world([gap])[0], "grad_norm": stats["grad_norm"],
                            "update_ok": stats["update_ok"]}
    finally:
        if engine is not None:
            engine.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    if P.rank() == 0:
        out.write_text(json.dumps(result, indent=1))
    P.shutdown()


if __name__ == "__main__":
    main()
