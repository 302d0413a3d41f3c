"""The whole R1 recipe as one command: every stage of a pipeline preset in order, each in its own process.

    python -m rlhf.pipeline pipeline=r1_tiny run_dir=PATH [until=STAGE] [KEY=VALUE ...] [STAGE:KEY=VALUE ...]

conf/pipeline/NAME.yaml lists the stages: a name, the rlhf.train overrides (`@other` stands for the run dir
of an earlier stage) and whether its model is evaluated. Stage NAME runs in RUN_DIR/NAME; KEY=VALUE goes to
every stage and evaluation, STAGE:KEY=VALUE to that stage only. After each evaluated stage, tools.eval
writes RUN_DIR/NAME/heldout/eval.json.

RUN_DIR/lineage.json records, per stage, the command, what it consumed (paths and sha256 of the
checkpoint manifests or dataset files) and what it produced, its config's hash and commit, and its wall
time. A re-run skips a finished stage whose command, inputs and composed config (conf/ presets included)
are unchanged; a stage killed midway runs again and resumes from its own checkpoint. RUN_DIR/summary.json
maps each evaluated stage to its held-out pass@1, cons@k, format and language_consistency (per task too,
for mixed eval data). Exit 2: a bad preset or argument, an input that is missing or changed since it was
recorded, or a finished stage whose config changed (the message names the stage and file).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from core.compose import CONF_DIR

USAGE = "usage: python -m rlhf.pipeline pipeline=NAME run_dir=PATH [until=STAGE] [KEY=VALUE] [STAGE:KEY=VALUE]"
REPORTED = ("pass@1", "format", "language_consistency", "response_length", "harmful", "ideal")


class PipelineError(Exception):
    """A preset, argument or artifact the pipeline cannot go on with; the message names it."""


def main(argv: list[str]) -> None:
    try:
        opts, common, per_stage = parse_args(argv)
        stages = load_preset(opts["pipeline"])
        run(stages, Path(opts["run_dir"]), opts["pipeline"], common, per_stage, opts.get("until"))
    except PipelineError as e:
        print(f"pipeline error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]) -> tuple[dict, list[str], dict[str, list[str]]]:
    opts, common, per_stage = {}, [], {}
    for a in argv:
        key, eq, _ = a.partition("=")
        if not eq:
            raise PipelineError(f"argument {a!r} is not KEY=VALUE. {USAGE}")
        if key in ("pipeline", "run_dir", "until"):
            opts[key] = a.split("=", 1)[1]
        elif ":" in key:
            stage, _, rest = a.partition(":")
            per_stage.setdefault(stage, []).append(rest)
        else:
            common.append(a)
    for need in ("pipeline", "run_dir"):
        if need not in opts:
            raise PipelineError(f"{need}= is missing. {USAGE}")
    return opts, common, per_stage


def load_preset(name: str) -> list[dict]:
    """conf/pipeline/NAME.yaml, or a YAML file of the same shape given by path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise PipelineError(f"no pipeline preset {name!r}. Fix: use one of {options}.")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages")
    if not stages or not all(isinstance(s, dict) and "name" in s and "args" in s for s in stages):
        raise PipelineError(f"{path}: expected `stages:`, a list of {{name, args, evaluate}} entries.")
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: stage names repeat ({names}); each stage needs its own run dir.")
    for i, s in enumerate(stages):
        for ref in refs(s["args"]):
            if ref not in names[:i]:
                raise PipelineError(f"{path}: stage {s['name']} uses @{ref}, which is not an earlier stage.")
    return stages


def refs(args: list[str]) -> list[str]:
    return [a.split("=@", 1)[1] for a in args if "=@" in a]


def run(stages: list[dict], root: Path, preset: str, common: list[str], per_stage: dict, until: str | None) -> None:
    unknown = set(per_stage) - {s["name"] for s in stages} | ({until} - {s["name"] for s in stages} if until else set())
    if unknown:
        raise PipelineError(f"no stage {sorted(unknown)} in pipeline {preset}. Stages: {[s['name'] for s in stages]}")
    root.mkdir(parents=True, exist_ok=True)
    lineage = _read(root / "lineage.json") or {"pipeline": preset, "stages": {}}
    for s in stages:
        name, out = s["name"], root / s["name"]
        argv = [a.replace("=@", f"={root}/") for a in s["args"]] + common + per_stage.get(name, [])
        inputs = {r: {"path": str(root / r), "sha256": fingerprint(root / r, name, lineage)} for r in refs(s["args"])}
        digest = config_digest(argv, name)
        done = lineage["stages"].get(name, {})
        if done.get("status") == "done" and out.exists():  # a deleted stage dir means: run it again
            if (done["argv"], done["inputs"]) != (argv, inputs):
                raise PipelineError(
                    f"stage {name} finished earlier with other arguments or inputs (see "
                    f"{root / 'lineage.json'}). Fix: delete {out} to run it again."
                )
            if done.get("config_digest", digest) != digest:  # lineages from before the digest: not checked
                raise PipelineError(
                    f"stage {name} finished earlier with another config: the same arguments now "
                    f"compose differently (a conf/ preset changed). Fix: delete {out} to run it "
                    "again, or restore the preset."
                )
            print(f"[pipeline] {name}: done earlier, skipped", flush=True)
        else:
            lineage["stages"][name] = {**_run_stage(name, argv, inputs, out), "config_digest": digest}
            _write(root / "lineage.json", lineage)
        if s.get("evaluate") and lineage["stages"][name].get("eval") is None:
            lineage["stages"][name]["eval"] = _evaluate(name, out, s.get("eval_args", []) + common)
            _write(root / "lineage.json", lineage)
        if name == until:
            break
    summary = {
        n: _reported(_read(root / n / "heldout" / "eval.json")) for n, st in lineage["stages"].items() if st.get("eval")
    }
    _write(root / "summary.json", summary)
    print(json.dumps(summary, indent=1), flush=True)


def config_digest(argv: list[str], stage: str) -> str:
    """sha256 of the config `argv` composes to (every conf/ preset it pulls in), run_dir aside."""
    import dataclasses

    from core.compose import compose
    from core.errors import ConfigError
    from rlhf.tracking import clean

    try:
        cfg = dataclasses.asdict(compose(argv))
    except ConfigError as e:
        raise PipelineError(f"stage {stage}: {e}") from None
    cfg.pop("run_dir", None)
    return hashlib.sha256(json.dumps(clean(cfg), sort_keys=True).encode()).hexdigest()


def _reported(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k in REPORTED or k.startswith("cons@")}
    if "per_task" in result:
        out["per_task"] = {t: _reported(r) for t, r in result["per_task"].items()}
    return out


def _run_stage(name: str, argv: list[str], inputs: dict, out: Path) -> dict:
    cmd = [sys.executable, "-m", "rlhf.train", *argv, f"run_dir={out}"]
    print(f"[pipeline] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    _call(cmd, out / "stage.log", name)
    config = out / "config.json"
    return {
        "status": "done",
        "argv": argv,
        "inputs": inputs,
        "wall_s": round(time.time() - t0, 1),
        "output": {"path": str(out), "sha256": fingerprint(out, name)},
        "config_sha256": _sha(config) if config.exists() else None,
        "commit": _read(config).get("git", {}).get("commit") if config.exists() else None,
    }


def _evaluate(name: str, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tools.eval", f"model={out}", *args, f"run_dir={out / 'heldout'}"]
    print(f"[pipeline] {name}: evaluating", flush=True)
    _call(cmd, out / "heldout.log", f"{name} (evaluation)")
    return {"path": str(out / "heldout" / "eval.json"), "sha256": _sha(out / "heldout" / "eval.json")}


def _call(cmd: list[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, R1_NO_PROGRESS="1")
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        print(f"[pipeline] {what} failed with exit {code}; log {log}:\n{tail}", file=sys.stderr)
        sys.exit(code)


def fingerprint(stage_dir: Path, user: str, lineage: dict | None = None) -> str:
    """sha256 of what a stage produced: its latest checkpoint's manifest (which hashes every shard) or its
    dataset.json (which holds the rows' hash). With `lineage`, it must equal what was recorded."""
    from parallel import checkpoint as ckpt

    data = stage_dir / "dataset.json"
    try:
        artifact = data if data.exists() else ckpt.resolve(ckpt.of_run(stage_dir)) / ckpt.MANIFEST
    except ckpt.CheckpointError as e:
        raise PipelineError(f"stage {user} needs {stage_dir}: {e}") from None
    digest = _sha(artifact)
    recorded = (lineage or {}).get("stages", {}).get(stage_dir.name, {}).get("output", {}).get("sha256")
    if lineage is not None and recorded != digest:
        raise PipelineError(
            f"stage {user} needs {artifact}, which changed since stage {stage_dir.name} wrote it "
            f"(recorded {recorded}, now {digest}). Fix: delete {stage_dir} and re-run."
        )
    return digest


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main(sys.argv[1:])
