"""Held-out evaluation of any checkpoint, as the R1 paper reports it.

    python -m tools.eval model=CKPT data=NAME run_dir=PATH [overrides]

CKPT: a run dir (its latest checkpoint), a checkpoints root or a step dir, or a Hugging Face model directory;
a model preset name still works (random weights, a baseline). The model preset is read from the checkpoint. Writes RUN_DIR/eval.json:
pass@1 over eval.k samples (eval.temperature 0.6, eval.top_p 0.95), cons@k, format and
language_consistency, per task, with the response-length distribution; with rollout.max_tool_calls > 0
the samples call the tool (rlhf.tool_calls) and tool_calls, tool_errors, tool_use and tool_use_correct are
reported. Exit 2 names a bad input.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.compose import compose
from core.data import DataError
from core.errors import ConfigError
from parallel import checkpoint as ckpt
from parallel.policy import build_policy

USAGE = "usage: python -m tools.eval model=CKPT_OR_RUN_DIR data=NAME run_dir=PATH [overrides]"


def resolve_model(overrides: list[str]) -> tuple[list[str], Path | None]:
    """Replaces model=PATH by the preset its checkpoint was trained with; returns the step dir too. A preset
    given beside the path (a driver passing the same overrides to every stage) must be that one."""
    values = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    paths = [v for v in values if "/" in v or Path(v).exists()]
    if not values:
        raise ConfigError(f"model= is missing. {USAGE}")
    if not paths:
        return overrides, None  # a preset name: random weights
    if ckpt.is_hf_dir(paths[0]):  # a Hugging Face model directory: its architecture, weights and tokenizer
        given = [o for o in overrides if not o.startswith(("model=", "model.path="))]
        return given + ["model=hf", f"model.path={paths[0]}"], Path(paths[0])
    step_dir = ckpt.resolve(ckpt.of_run(paths[0]))
    meta = ckpt.read_meta(step_dir)
    preset = meta.get("model")
    hf_dir = (meta.get("model_config") or {}).get("path")  # model=hf: its architecture is that directory's
    if not preset:
        raise ConfigError(f"model={paths[0]}: {step_dir} does not record its model preset.")
    others = set(values) - {paths[0], preset}
    if others:
        raise ConfigError(
            f"model={sorted(others)[0]} was given, but {step_dir} holds a {preset} model. Fix: drop that override."
        )
    given = [o for o in overrides if not o.startswith("model=")]
    return given + [f"model={preset}"] + ([f"model.path={hf_dir}"] if hf_dir else []), step_dir


def evaluate_checkpoint(overrides: list[str]) -> dict:
    from core.run_tokenizer import run_tokenizer
    from inference import colocated
    from parallel import parallelize as P
    from rlhf.evaluate import SCORES, evaluate
    from rlhf.judge import refuse_judged
    from rlhf.prompts import load_prompts
    from rlhf.rewards import RewardPool
    from rlhf.tool_calls import ToolRunner

    overrides, step_dir = resolve_model(overrides)
    cfg = compose(overrides)
    run_dir = Path(cfg.run_dir)
    tok = run_tokenizer(cfg, weights_from=step_dir or "")
    rows = load_prompts(cfg.data, "eval", tok, cfg.reward.answer)
    refuse_judged(rows, "tools.eval")
    env = P.init_distributed(cfg)
    try:
        policy = build_policy(cfg, with_optimizer=False)
        meta = {"step": None}
        if step_dir and ckpt.is_hf_dir(step_dir):
            ckpt.load_weights(policy, step_dir)
        elif step_dir:
            meta = ckpt.load(policy, step_dir, with_optimizer=False)
        engine = colocated.start_engine(cfg, policy, run_dir / "hf_model", tok)
        with engine or contextlib.nullcontext(), RewardPool(SCORES, cfg.reward.timeout_s, cfg.reward.workers) as pool:
            tools = ToolRunner.from_config(cfg.rollout, tok, cfg.reward.workers)  # rollout.max_tool_calls > 0
            result = evaluate(engine, tok, rows, cfg.eval, pool, cfg.rollout.max_new_tokens, tools)
    finally:
        P.shutdown()
    result = {
        "model": str(step_dir) if step_dir else cfg.model.name,
        "model_preset": cfg.model.name,
        "step": meta["step"],
        "data": cfg.data.name,
        **result,
    }
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "eval.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(run_dir / "eval.json")
    return result


def main(argv: list[str]) -> None:
    if not argv or any(a in ("-h", "--help") for a in argv):
        sys.exit(USAGE)
    try:
        result = evaluate_checkpoint(argv)
    except (ConfigError, DataError, ckpt.CheckpointError) as e:
        print(f"eval error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = {k: v for k, v in result.items() if k not in ("per_task", "response_length_dist")}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
