"""Plots and an HTML page for one run directory.

    python -m tools.report run_dir=runs/demo        # or: python -m tools.report --run-dir runs/demo

Reads RUN_DIR/metrics.jsonl (and eval.json, summary.json, train_summary.json when present), writes one
PNG per plot under RUN_DIR/report/ and RUN_DIR/report.html, a self-contained page that shows them by
relative path beside a table of the final and eval numbers. A plot whose metrics the run never logged is
skipped, and the page says so. Exit status 2, naming the file (and line): metrics.jsonl is missing or
empty, a line of it is not a JSON object with a numeric "step", or one of the summary files is not JSON.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import math
import sys
from pathlib import Path

from core.ledger import PHASES

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILES = ("eval.json", "summary.json", "train_summary.json")
REPORT_DIR, REPORT_HTML = "report", "report.html"

# (file stem, title, y label, keys): one PNG each, drawn when at least one key has a finite value.
PLOTS = [
    ("reward", "Reward", "reward", ["reward/mean", "reward/accuracy", "reward/format"]),
    ("response_length", "Response length", "tokens", ["response_length/mean"]),
    ("kl", "KL to the reference policy", "KL", ["train/kl"]),
    ("entropy", "Policy entropy", "nats / token", ["train/entropy"]),
    (
        "logprob_gap",
        "Rollout engine vs trainer log-prob gap",
        "|Δ log p|",
        ["rollout/logprob_diff_mean", "rollout/logprob_diff_max"],
    ),
    (
        "consistency",
        "Rollout engine vs trainer next-token distribution",
        "KL / TV per token",
        ["consistency/kl_mean", "consistency/kl_max", "consistency/tv_mean"],
    ),
    ("tools", "Tool calls (rlhf.tool_calls)", "per sample / share", ["tool/calls_per_sample", "tool/use_frac"]),
    ("loss", "Training loss", "loss", ["train/loss"]),
]


class ReportError(Exception):
    """An input the report cannot read; the message names the file (and line)."""


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl sorted by step; a step logged twice keeps its last row."""
    if not path.is_file():
        raise ReportError(f"{path} not found: the run has logged no metrics (is run_dir right?)")
    by_step: dict = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: line {i} is not JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise ReportError(f"{path}: line {i} is not a JSON object with a numeric 'step': {line[:80]!r}")
        by_step[row["step"]] = row
    if not by_step:
        raise ReportError(f"{path} has no rows: nothing to report yet")
    return [by_step[s] for s in sorted(by_step)]


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not JSON (line {e.lineno}: {e.msg})") from None
    return data if isinstance(data, dict) else {"value": data}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if _is_num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(ys: list[float]) -> list[float]:
    """Centered moving average over about 1/40 of the points (at most 51, narrowing symmetrically at the
    ends), so the line does not lag a fast early drop the way an exponential average does."""
    half = min(25, len(ys) // 80)
    csum = [0.0]
    for y in ys:
        csum.append(csum[-1] + y)
    out = []
    for i in range(len(ys)):
        h = min(half, i, len(ys) - 1 - i)  # symmetric, so the ends are not pulled toward the middle
        lo, hi = i - h, i + h + 1
        out.append((csum[hi] - csum[lo]) / (hi - lo))
    return out


# ---------------------------------------------------------------- plotting


def plot(rows: list[dict], keys: list[str], title: str, ylabel: str, out: Path) -> list[str]:
    """Raw points and a smoothed line per key into `out` (PNG, Agg); returns the keys drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = []
    for i, key in enumerate(keys):
        xs, ys = series(rows, key)
        if not xs:
            continue
        color = f"C{i}"
        ax.scatter(xs, ys, s=6, color=color, alpha=0.3, linewidths=0)
        ax.plot(xs, smooth(ys), color=color, linewidth=1.6, label=key)
        drawn.append(key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(out, format="png")
    return drawn


def plot_step_time(rows: list[dict], out: Path) -> list[str]:
    """The time ledger (core.ledger) as stacked areas per step, the step's wall time as a line over them:
    the gap between the two is time no phase accounts for."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    timed = [r for r in rows if _is_num(r.get("time/step_s"))]
    keys = [f"time/{p}_s" for p in PHASES if any((r.get(f"time/{p}_s") or 0) > 0 for r in timed)]
    fig = Figure(figsize=(7, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in timed]
    values = [[r.get(k) if _is_num(r.get(k)) else 0.0 for r in timed] for k in keys]
    from matplotlib import colormaps

    palette = colormaps["tab20"]  # 20 distinct colours: every phase its own (the default cycle has 10)
    colors = [palette(PHASES.index(k[5:-2]) % 20) for k in keys]
    ax.stackplot(steps, values, labels=[k[5:-2] for k in keys], colors=colors)
    ax.plot(steps, [r["time/step_s"] for r in timed], color="black", linewidth=1.2, label="step wall time")
    ax.set_title("Where a step's time goes")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.savefig(out, format="png")
    return keys


# ---------------------------------------------------------------- the page


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "\n".join(map(str, v))
    return str(v)


def _table(title: str, items: list[tuple[str, object]], note: str = "") -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td><pre>{html.escape(_fmt(v))}</pre></td></tr>" for k, v in items)
    note = f"<p class=note>{html.escape(note)}</p>" if note else ""
    return f"<h2>{html.escape(title)}</h2>{note}<table>{body}</table>"


def final_values(rows: list[dict]) -> list[tuple[str, object]]:
    """Each metric's last finite value (and its step), in first-seen key order."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
    out = []
    for key in keys:
        xs, ys = series(rows, key)
        if xs:
            out.append((f"{key} (step {_fmt(xs[-1])})", ys[-1]))
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td{border:1px solid #ddd;padding:2px 8px;vertical-align:top}
td pre{margin:0;font-family:ui-monospace,monospace;white-space:pre-wrap}.note{color:#777}"""


def build(run_dir: Path) -> Path:
    """Writes RUN_DIR/report/*.png and RUN_DIR/report.html; returns the HTML path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    extras = {name: read_json(run_dir / name) for name in SUMMARY_FILES}
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    figures, skipped = [], []
    for stem, title, ylabel, keys in PLOTS:
        png = out_dir / f"{stem}.png"
        if not any(series(rows, k)[0] for k in keys):
            png.unlink(missing_ok=True)  # a stale plot from an earlier report
            skipped.append(f"{title}: no finite {', '.join(keys)} in {METRICS_FILE}")
            continue
        drawn = plot(rows, keys, title, ylabel, png)
        alt = html.escape(", ".join(drawn))
        figures.append(f'<h2>{html.escape(title)}</h2><img src="{REPORT_DIR}/{png.name}" alt="{alt}">')

    png = out_dir / "step_time.png"
    if any(_is_num(r.get("time/step_s")) for r in rows):
        drawn = plot_step_time(rows, png)
        alt = html.escape(", ".join(drawn))
        figures.append(f'<h2>Step time</h2><img src="{REPORT_DIR}/{png.name}" alt="{alt}">')
    else:
        png.unlink(missing_ok=True)
        skipped.append(f"Step time: no time/step_s in {METRICS_FILE}")

    steps = [r["step"] for r in rows]
    parts = [
        f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>",
        f"<p class=note>{html.escape(str(run_dir.resolve()))} · {len(rows)} logged steps "
        f"({_fmt(steps[0])} to {_fmt(steps[-1])}) · generated {datetime.datetime.now():%Y-%m-%d %H:%M}</p>",
        *figures,
    ]
    if skipped:
        parts.append("<h2>Skipped plots</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in skipped) + "</ul>")
    for name, data in extras.items():
        if data is not None:
            parts.append(_table(name, list(data.items())))
    parts.append(_table(f"Final values in {METRICS_FILE}", final_values(rows)))

    page = run_dir / REPORT_HTML
    head = f"<meta charset=utf-8><title>{html.escape(run_dir.resolve().name)} report</title><style>{CSS}</style>"
    page.write_text(f"<!doctype html><html><head>{head}</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return page


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Hydra style `run_dir=PATH`, like `python -m rlhf.train`, as well as `--run-dir PATH`.
    argv = [f"--run-dir={a.split('=', 1)[1]}" if a.startswith("run_dir=") else a for a in argv]
    parser = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory (run_dir=PATH works too)")
    args = parser.parse_args(argv)
    try:
        page = build(args.run_dir)
    except ReportError as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
