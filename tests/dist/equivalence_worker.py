"""Parallel-vs-single-process equivalence, run under torchrun (or as one process for the reference).

    python tests/dist/equivalence_worker.py reference WORKDIR
    torchrun --nproc-per-node N tests/dist/equivalence_worker.py cases WORKDIR CASE [CASE ...]

The reference (one process, TP1) saves: the initial weights and optimizer (a checkpoint), and for a
fixed batch the loss, full logits, gradients (as a checkpoint whose "weights" are the grads) and the
weights after one Adam step. A case loads the initial checkpoint at its own layout (megatron reshards
it), repeats the work, and compares; gradients and stepped weights travel back through the same
checkpoint machinery and are compared at TP1. Results land in WORKDIR/results.json (one row per case).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import parallel  # noqa: E402,F401  (applies the CPU compatibility layer before megatron loads)
from core.compose import compose  # noqa: E402
from core.data import causal_mask  # noqa: E402
from parallel import checkpoint as ckpt  # noqa: E402
from parallel import parallelize as P  # noqa: E402
from parallel.policy import Policy, build_policy, unwrap
from parallel.step import forward_backward, gather_logits, optimizer_step, train_step

MODELS = ("tiny_dense", "tiny_dsv3")
CASES = {
    # name: (model, overrides); world size comes from torchrun.
    "dense_tp2": ("tiny_dense", ["parallel.tensor=2"]),
    # A 24-token budget (stage.train.micro_batch_tokens: GRPO's micro-batches only) splits the GRPO batch into
    # micro-batches of 1, 1, 2 and 2 rows: pipeline stages exchange shapes that differ in batch size too.
    "dense_pp2": ("tiny_dense", ["parallel.pipeline=2", "stage.train.micro_batch_tokens=24"]),
    "dense_dp2_distopt": ("tiny_dense", ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true"]),
    "dense_tp2_to_tp1": ("tiny_dense", []),  # loads the checkpoint dense_tp2 saved at TP2
    "dsv3_tp2_sp": ("tiny_dsv3", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "dsv3_pp2": ("tiny_dsv3", ["parallel.pipeline=2"]),
    "dsv3_ep2": ("tiny_dsv3", ["parallel.expert=2"]),
    "dsv3_tp2_ep2_sp": ("tiny_dsv3", ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1",
                                      "parallel.sequence_parallel=true"]),
    "dsv3_dp2_distopt": ("tiny_dsv3", ["parallel.distributed_optimizer=true"]),
    "dsv3_pp2_ep2_from_tp2_ep2": ("tiny_dsv3", ["parallel.pipeline=2", "parallel.expert=2"]),
    "dense_resume_distopt": ("tiny_dense", ["parallel.distributed_optimizer=true"]),
}
SAVES_FOR = {"dense_tp2": "dense_tp2_to_tp1", "dsv3_tp2_ep2_sp": "dsv3_pp2_ep2_from_tp2_ep2"}
LOADS_FROM = {v: k for k, v in SAVES_FOR.items()}
BATCH, SEQ, MICRO = 4, 16, 2
# Layouts that also run GRPO on rows of different lengths in trimmed micro-batches (rlhf.grpo; dense_pp2's
# filled to a token budget), against the reference's micro-batches of 2 rows padded to the batch's width:
# log-probs, the loss and its gradients.
GRPO_CASES = ("dense_tp2", "dense_pp2", "dsv3_tp2_sp", "dense_dp2_distopt")
GRPO_SETTINGS = dict(loss_agg="seq_mean_token_mean", eps_low=0.2, eps_high=0.28, kl="k3", kl_coef=0.05, max_len=16)
BENCH_STEPS = int(os.environ.get("R1_BENCH_STEPS", "0"))


def config(model: str, overrides: list[str]):
    # adam_eps 1e-4: with eps ~1e-8, m/sqrt(v) turns 1e-8 grad noise on near-zero grads into ±lr
    # jumps; a larger eps keeps the update Lipschitz in the grad so a 1e-5 bound on weights is fair.
    return compose([f"model={model}", "logger=none", "stage.train.optim.lr=1e-3", "stage.train.optim.adam_eps=1e-4",
                    "stage.train.optim.weight_decay=0.01", f"stage.train.micro_batch_size={MICRO}",
                    f"stage.train.global_batch_size={BATCH}", *overrides])


def global_batch(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()
    rows = [dict(tokens=tokens[i, :-1], labels=tokens[i, 1:], loss_mask=mask[i]) for i in range(BATCH)]
    return rows


def micro_batches(rows: list[dict]) -> list[dict]:
    out = []
    for i in range(0, len(rows), MICRO):
        chunk = rows[i : i + MICRO]
        mb = {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}
        mb["position_ids"] = torch.arange(SEQ).expand(len(chunk), SEQ)
        mb["attention_mask"] = causal_mask(SEQ)
        out.append(mb)
    return out


def logits_forward(batch, model):
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    return out, lambda o: (o.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": gather_logits(o).detach()})


def setup(model: str, overrides: list[str]) -> Policy:
    P.shutdown_model_parallel()
    cfg = config(model, overrides)
    P.init_distributed(cfg)
    return build_policy(cfg)


def dp_rows(rows):
    return P.split_for_data_parallel(rows)


def run_logits(policy, rows) -> torch.Tensor | None:
    data = forward_backward(policy, micro_batches(rows), forward_only=True, forward=logits_forward)
    return torch.cat([d["logits"] for d in data]) if data else None


def save_grads(policy, path: Path) -> None:
    """Saves the reduced grads as a weights-only checkpoint, so they reshard like weights."""
    saved = {}
    for name, p in unwrap(policy.chunks[0]).named_parameters():
        saved[name] = p.data.clone()
        p.data.copy_(p.main_grad)
    ckpt.save(policy, path, with_optimizer=False)
    for name, p in unwrap(policy.chunks[0]).named_parameters():
        p.data.copy_(saved[name])


def grpo_run(policy, out: Path, trimmed: bool) -> dict:
    """GRPO log-probs (masked) and one loss backward on tests.conftest's grpo_batch; grads saved to out."""
    from core.data import micro_batches as padded_micro_batches
    from rlhf import grpo
    from rlhf.losses import LossSettings
    from tests.conftest import grpo_batch

    vocab = policy.cfg.model.vocab_size
    mine = P.split_for_data_parallel(range(6))  # this data-parallel rank's rows (all six on one replica)
    batch = grpo_batch(vocab)
    # The mismatch oracle's candidates: 5 ids per position, scored over the vocab-parallel logits
    batch["engine_top_ids"] = torch.randint(0, vocab, (6, 16, 5), generator=torch.Generator().manual_seed(3))
    batch["engine_top_logp"] = torch.zeros(6, 16, 5)
    batch = {k: v[mine] for k, v in batch.items()}
    rows = list(range(len(mine)))
    if trimmed:
        scored = grpo.scoring_pass(policy, batch, MICRO, 1.0, oracle=True)
        logp, top = scored.logp, scored.top_logp
        mbs = grpo._trimmed(policy, batch, rows, MICRO)[0]
    else:
        data = forward_backward(policy, padded_micro_batches(batch, rows, MICRO), forward_only=True,
                                forward=grpo._forward(vocab, 1.0, None, oracle=True))
        logp, top = torch.cat([d["logp"] for d in data]), torch.cat([d["top_logp"] for d in data])
        mbs = padded_micro_batches(batch, rows, MICRO)
    data = forward_backward(policy, mbs, forward=grpo._forward(vocab, 1.0, LossSettings(**GRPO_SETTINGS)))
    if not policy.cfg.parallel.distributed_optimizer:  # which keeps only this rank's shard of the grads
        save_grads(policy, out / "grpo_grads")
    # the loss: (sum, count) reduced over micro-batches and data-parallel ranks, divided once (rlhf.losses)
    mask = batch["loss_mask"]
    return {"logp": logp * mask, "top_logp": top * mask[..., None], "loss": P.reduce_loss(data), "rows": mine}


def reference(workdir: Path) -> None:
    for model in MODELS:
        out = workdir / model
        policy = setup(model, [])
        rows = global_batch(policy.cfg.model.vocab_size)
        ckpt.save(policy, out / "init")
        logits = run_logits(policy, rows)
        policy.optimizer.zero_grad()
        data = forward_backward(policy, micro_batches(rows))
        loss = P.reduce_loss(data)
        save_grads(policy, out / "grads")
        optimizer_step(policy, loss)
        ckpt.save(policy, out / "after_step", with_optimizer=False)
        step_s = timed_step(policy, rows)
        ckpt.save(policy, out / "after_two_steps", with_optimizer=False)
        if BENCH_STEPS:
            step_s = statistics.median(timed_step(policy, rows) for _ in range(BENCH_STEPS))
        torch.save({"loss": loss, "logits": logits, "step_s": step_s}, out / "outputs.pt")
        policy = setup(model, [])  # GRPO from the initial weights, as the cases run it
        ckpt.load(policy, out / "init", with_optimizer=False)
        torch.save(grpo_run(policy, out, trimmed=False), out / "grpo.pt")
    P.shutdown()


def _max_diff_at_tp1(model: str, a: Path, b: Path, skip: str | None = None) -> float:
    """Loads two weights-only checkpoints into a TP1 model and returns the max abs difference (of the
    tensors whose name does not contain `skip`)."""
    policy = setup(model, ["stage.train.micro_batch_size=1"])  # no batch runs; any DP size must validate
    ckpt.load(policy, a, with_optimizer=False)
    ref = {k: v.clone() for k, v in unwrap(policy.chunks[0]).state_dict().items() if torch.is_tensor(v)}
    ckpt.load(policy, b, with_optimizer=False)
    got = unwrap(policy.chunks[0]).state_dict()
    return max(
        float((got[k].float() - v.float()).abs().max()) for k, v in ref.items() if v.numel() and not (skip and skip in k)
    )


def timed_step(policy, rows) -> float:
    """Wall seconds of one optimizer step, the slowest rank's."""
    torch.distributed.barrier()
    start = time.perf_counter()
    train_step(policy, micro_batches(rows))
    return _all_max(time.perf_counter() - start)


def _all_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def run_case(name: str, workdir: Path) -> dict:
    model, overrides = CASES[name]
    ref_dir, case_dir = workdir / model, workdir / name
    expected = torch.load(ref_dir / "outputs.pt")
    policy = setup(model, overrides)
    start = workdir / LOADS_FROM[name] / "saved" if name in LOADS_FROM else ref_dir / "init"
    ckpt.load(policy, start, with_optimizer=False)
    rows = dp_rows(global_batch(policy.cfg.model.vocab_size))
    result = {"case": name, "layout": ckpt.model_parallel_layout(), "world": torch.distributed.get_world_size(),
              "single_process_step_s": expected["step_s"]}

    logits = run_logits(policy, rows)
    diff = 0.0
    if logits is not None:
        i = P.data_parallel_rank() * len(rows)
        want = expected["logits"][i : i + len(rows)]
        diff = float((logits - want).abs().max())
    result["logits_max_diff"] = _all_max(diff)
    if name in LOADS_FROM:
        return result
    if name in GRPO_CASES:
        want, got = torch.load(ref_dir / "grpo.pt"), grpo_run(policy, case_dir, trimmed=True)
        last = P.is_last_pipeline_stage()
        # the sampled tokens' log-probs and the oracle's candidates' (parallel.logprobs.candidate_logprobs)
        logp_diff = max(float((got[k] - want[k][got["rows"]]).abs().max()) for k in ("logp", "top_logp")) if last else 0.0
        result["grpo_logp_diff"] = _all_max(logp_diff)
        result["grpo_loss_diff"] = abs(got["loss"] - want["loss"])
        # The aux-loss-free expert bias (a buffer, saved beside the grads) is updated from the tokens routed
        # to each expert, padding included: fewer padded tokens move it differently, by design.
        if not policy.cfg.parallel.distributed_optimizer:
            result["grpo_grads_max_diff"] = _max_diff_at_tp1(
                model, ref_dir / "grpo_grads", case_dir / "grpo_grads", skip="expert_bias"
            )
        policy = setup(model, overrides)  # _max_diff_at_tp1 left a TP1 layout
        ckpt.load(policy, start, with_optimizer=False)
    if name in SAVES_FOR:
        ckpt.save(policy, case_dir / "saved", with_optimizer=False)

    policy.optimizer.zero_grad()
    data = forward_backward(policy, micro_batches(rows))
    loss = P.reduce_loss(data)
    result["loss_diff"] = abs(loss - expected["loss"])
    distopt = policy.cfg.parallel.distributed_optimizer
    if not distopt:  # the distributed optimizer keeps only this rank's shard of the reduced grads
        save_grads(policy, case_dir / "grads")
    optimizer_step(policy, loss)
    if name == "dense_resume_distopt":
        ckpt.save(policy, case_dir / "resume")
        policy = setup(model, overrides)
        ckpt.load(policy, case_dir / "resume")
        result["resumed_step"] = policy.step
    else:
        ckpt.save(policy, case_dir / "after_step", with_optimizer=False)
    result["step_s"] = timed_step(policy, rows)  # the second step: past the first call's warm-up
    ckpt.save(policy, case_dir / "after_two_steps", with_optimizer=False)
    if BENCH_STEPS:  # tools/bench: the median of more steps; comparisons below read saved checkpoints
        result["step_s"] = statistics.median(timed_step(policy, rows) for _ in range(BENCH_STEPS))

    if not distopt:
        result["grads_max_diff"] = _max_diff_at_tp1(model, ref_dir / "grads", case_dir / "grads")
    if name != "dense_resume_distopt":
        result["step_max_diff"] = _max_diff_at_tp1(model, ref_dir / "after_step", case_dir / "after_step")
    result["two_steps_max_diff"] = _max_diff_at_tp1(model, ref_dir / "after_two_steps", case_dir / "after_two_steps")
    return result


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    if mode == "reference":
        return reference(workdir)
    results = []
    for name in sys.argv[3:]:
        results.append(run_case(name, workdir))
    if torch.distributed.get_rank() == 0:
        prior = json.loads((workdir / "results.json").read_text()) if (workdir / "results.json").exists() else []
        (workdir / "results.json").write_text(json.dumps(prior + results, indent=1))
    P.shutdown()


if __name__ == "__main__":
    main()
