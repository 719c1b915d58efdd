"""`hpcforge report RUN_DIR...`: one self-contained HTML page of one or more runs, made offline.

Compute nodes of many clusters have no internet, so the page needs none: every figure is a PNG
inlined as base64, the style is inline, nothing is fetched. Per run it reads the trainer's
metrics.jsonl (every row it also logged to W&B, with or without a W&B run), the config of its
checkpoint (redacted, as W&B got it), the latest image of each key the offline W&B run saved as a
file (every run folder of the run's id, so an evaluation that resumed the run is included); plus
the `<checkpoint>.eval.json` files of `hpcforge evaluate`, the `.explain.json` and `.attack.json` of
`hpcforge explain` and `hpcforge attack`, and their figures. W&B's binary run files are not parsed:
W&B has no public reader for them (issue 17).
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.analysis.precise import AUC_GOAL
from pipeline.analysis.precise import GOAL as W1_GOAL
from pipeline.core import figures
from pipeline.core.errors import UserError

PROBES = ("eval", "explain", "attack")   # <checkpoint stem>.<kind>.json, from those commands
PROBE_FIGURES = tuple(f"{kind}_figures/" for kind in PROBES)


@dataclass
class RunRecord:
    """What the report reads of one finished run: its logged rows, config, latest images and
    evaluations (not pipeline.train.run.Run, the live run a trainer steps)."""
    name: str
    train_dir: Path
    origin: str                                   # where the metrics came from
    rows: list[dict[str, Any]]                    # logged rows, each with "_step"
    config: dict[str, Any]
    images: dict[str, Path] = field(default_factory=dict)   # latest logged image per key
    evals: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- reading runs
def train_dir_of(path: Path) -> tuple[Path, Path | None]:
    """(the trainer's run folder, a W&B run folder when one was named) for a RUN_DIR argument."""
    if list(path.glob("run-*.wandb")):           # a W&B run folder: <train>/wandb/<run>
        return path.parent.parent, path
    if (path / "train").is_dir() and not (path / "metrics.jsonl").exists():
        return path / "train", None              # an experiment's output_dir
    return path, None


def wandb_files(train_dir: Path, run_dir: Path | None) -> list[Path]:
    """The .wandb files of the run (its latest id unless a run folder was named), oldest first."""
    files = sorted((train_dir / "wandb").glob("*run-*/run-*.wandb"), key=lambda p: p.parent.name)
    if run_dir is not None:
        run_id = next(run_dir.glob("run-*.wandb")).stem
    elif (latest := train_dir / "wandb" / "latest-run").exists():
        run_id = next(latest.resolve().glob("run-*.wandb"), Path("")).stem
        run_id = run_id if run_id else (files[-1].stem if files else "")
    else:
        run_id = files[-1].stem if files else ""
    return [f for f in files if f.stem == run_id]


MEDIA = re.compile(r"(?P<name>.+)_(?P<step>\d+)_[0-9a-f]+\.png")   # W&B: <name>_<step>_<hash>.png


def images_of(wandb_runs: list[Path]) -> dict[str, Path]:
    """Latest image file per logged image key ("images/samples" -> .../images/samples_24_<hash>.png)
    in the W&B run folders, later folders winning ties; evaluation figures come from their JSON."""
    found: dict[str, tuple[int, Path]] = {}
    for run in wandb_runs:
        media = run / "files" / "media" / "images"
        for png in sorted(media.rglob("*.png")):
            m = MEDIA.fullmatch(png.name)
            key = str(png.relative_to(media).parent / m["name"]) if m else ""
            if not m or key.startswith(PROBE_FIGURES):
                continue
            if key not in found or int(m["step"]) >= found[key][0]:
                found[key] = (int(m["step"]), png)
    return {k: p for k, (_, p) in found.items()}


def metric_rows(train_dir: Path) -> list[dict[str, Any]]:
    """The trainer's metrics.jsonl, one row per logged step, "step" also as W&B's "_step"."""
    lines = (train_dir / "metrics.jsonl").read_text().splitlines()
    return [{"_step": r.get("step", i), **r} for i, r in enumerate(map(json.loads, lines))]


def read_run(arg: str | Path) -> RunRecord:
    path = Path(arg)
    if not path.is_dir():
        raise UserError(f"no run folder at {path}; pass an experiment's output_dir, its train/ "
                        f"folder or a W&B run folder (e.g. outputs/demo or outputs/demo/train)")
    train_dir, run_dir = train_dir_of(path)
    files = wandb_files(train_dir, run_dir)
    if not (train_dir / "metrics.jsonl").exists():
        raise UserError(f"{path}: no metrics.jsonl and no W&B run files (wandb/*/run-*.wandb); "
                        f"point at the folder `hpcforge train` wrote (output_dir or output_dir/train)")
    rows = metric_rows(train_dir)
    origin = (f"metrics.jsonl, images of W&B offline run {files[0].stem.removeprefix('run-')}"
              if files else "metrics.jsonl (no W&B run)")
    evals = [json.loads(p.read_text()) for kind in PROBES
             for p in sorted(train_dir.glob(f"checkpoints/*.{kind}.json"))]
    config = _checkpoint_config(train_dir)
    model = config.get("model", {}).get("name", "?") if isinstance(config.get("model"), dict) else "?"
    name = f"{train_dir.parent.name} ({model})" if train_dir.name == "train" else f"{train_dir.name} ({model})"
    return RunRecord(name, train_dir, origin, rows, config, images_of([f.parent for f in files]), evals)


RUN_CONFIG = ("dataset", "versions", "code_version")   # what the trainer adds to W&B's config


def _checkpoint_config(train_dir: Path) -> dict[str, Any]:
    """The config the W&B run got: the checkpoint's (redacted) config, its data and versions."""
    from pipeline.core.checkpoint import load
    for path in sorted(train_dir.glob("checkpoints/*.pt")):
        try:
            ckpt = load(path)
        except Exception:  # a corrupt checkpoint only costs the report its config section
            continue
        return {**ckpt.get("config", {}), **{k: ckpt[k] for k in RUN_CONFIG if k in ckpt}}
    return {}


# --------------------------------------------------------------------------- tables
def final_values(run: RunRecord) -> dict[str, float]:
    """The last logged value of every scalar train/, val/, perf/ key, and the evaluation metrics."""
    out: dict[str, float] = {}
    for row in run.rows:
        for k, v in row.items():
            if k.startswith(("train/", "val/", "perf/")) and isinstance(v, (int, float)):
                out[k] = v
    steps = [r["_step"] for r in run.rows if "_step" in r]
    out["steps"] = max(steps) if steps else 0
    for ev in run.evals:
        kind = ev.get("kind", "eval")
        out.update({f"{kind}/{k}": v for k, v in ev["metrics"].items() if isinstance(v, (int, float))})
    return out


def metrics_table(runs: list[RunRecord]) -> str:
    finals = [final_values(r) for r in runs]
    keys = sorted(set().union(*finals), key=lambda k: (k.split("/")[0] != "steps", k))
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    body = "".join(f"<tr><td>{html.escape(k)}</td>"
                   + "".join(f"<td>{_fmt(f.get(k))}</td>" for f in finals) + "</tr>" for k in keys)
    return f"<table><tr><th>metric (final value)</th>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "&mdash;"
    return f"{v:.5g}" if isinstance(v, float) else html.escape(str(v))


# --------------------------------------------------------------------------- scorecard
# A generator is judged by W1 / the real-vs-real floor (1 is perfect, issue #15's goal 2x) and by a
# classifier told to separate its samples from real ones (0.5: it cannot). AUC_GOAL: the
# CaloChallenge 2022 entries' best low-level AUCs lay at 0.53-0.68, its GANs' at 0.89-0.94 (arXiv
# 2410.21611). Both goals are the precise Ising protocol's (pipeline/analysis/precise.py), so the
# two never disagree.


@dataclass(frozen=True)
class Check:
    """One line of a run's scorecard: a verdict metric, its reference, met or not."""
    what: str
    value: float
    reference: str
    met: bool


def checks(m: dict[str, Any]) -> list[Check]:
    """The task's verdict metrics of one evaluation (`hpcforge evaluate`'s metrics) against their
    references: accuracy against the most common class and chance, RMSE against predicting the
    train mean, W1 / floor against the 2x goal, classifier AUC, Frechet distance / its floor,
    anomaly ROC AUC against chance."""
    out = []
    if "accuracy" in m and ("accuracy_majority" in m or "accuracy_chance" in m):
        ref = max(m.get("accuracy_majority", 0.0), m.get("accuracy_chance", 0.0))
        out.append(Check("accuracy", m["accuracy"], f"most common class {_num(m.get('accuracy_majority'))}"
                         f", chance {_num(m.get('accuracy_chance'))}", m["accuracy"] > ref))
    if "rmse" in m and "rmse_baseline" in m:
        r2 = f"; R\u00b2 {m['r2']:.3f}" if "r2" in m else ""
        out.append(Check("RMSE (target's units)", m["rmse"],
                         f"predicting the train mean {_num(m['rmse_baseline'])}{r2}",
                         m["rmse"] < m["rmse_baseline"]))
    for k in sorted(k for k in m if k.startswith("w1_ratio/")):
        out.append(Check(f"W1 / floor, {k.split('/', 1)[1]}", m[k],
                         f"goal \u2264 {W1_GOAL:g} (1 is perfect)", m[k] <= W1_GOAL))
    if "classifier/auc" in m:
        out.append(Check("classifier AUC, generated vs real", m["classifier/auc"],
                         f"goal \u2264 {AUC_GOAL:g} (0.5: indistinguishable; real vs real "
                         f"{_num(m.get('classifier/auc_reference'))})", m["classifier/auc"] <= AUC_GOAL))
    if m.get("frechet_reference"):
        ratio = m["frechet_distance"] / m["frechet_reference"]
        out.append(Check("Fr\u00e9chet distance / floor", ratio, f"goal \u2264 {W1_GOAL:g}",
                         ratio <= W1_GOAL))
    if "anomaly_roc_auc" in m:
        out.append(Check("anomaly ROC AUC", m["anomaly_roc_auc"], "0.5 (chance)",
                         m["anomaly_roc_auc"] > 0.5))
    return out


def _num(v: Any) -> str:
    return "?" if v is None else f"{v:.4g}"


def latest_eval(run: RunRecord) -> dict[str, Any] | None:
    evals = [ev for ev in run.evals if ev.get("kind", "eval") == "eval"]
    return max(evals, key=lambda ev: ev.get("step", 0)) if evals else None


def scorecard(run: RunRecord) -> str:
    """The run's answer: its verdict metrics against their references, met or not."""
    ev = latest_eval(run)
    head = f"<h3>{html.escape(run.name)}</h3>"
    if ev is None:
        return head + ("<p class=note>not evaluated: run <code>hpcforge evaluate "
                       "&lt;its checkpoint&gt;</code>, then report again</p>")
    rows = "".join(f"<tr><td>{html.escape(c.what)}</td><td>{_fmt(float(c.value))}</td>"
                   f"<td class=ref>{html.escape(c.reference)}</td>"
                   f"<td class={'met' if c.met else 'unmet'}>{'met' if c.met else 'not met'}</td></tr>"
                   for c in checks(ev["metrics"]))
    verdicts = [n for n in ev.get("notes", []) if n.startswith("verdict:")]
    where = (f"<p class=meta>{html.escape(Path(ev['checkpoint']).name)}, step {ev['step']}, "
             f"{html.escape(ev['split'])} split, {ev['metrics'].get('samples', '?')} samples</p>")
    table = (f"<table class=score><tr><th>check</th><th>value</th><th>reference</th><th></th></tr>"
             f"{rows}</table>" if rows else "<p class=note>no verdict metric in its evaluation</p>")
    return head + where + table + "".join(f"<p class=note>{html.escape(v)}</p>" for v in verdicts)


# --------------------------------------------------------------------------- panels of all runs
def unit_of(run: RunRecord, key: str) -> str:
    """What a logged value of `key` is measured in for this run: a loss term means what the run's
    loss, target and normalisation make it (GeV\u00b2 MSE, cross-entropy, standardised MSE share
    a key but not a unit); a generator's terms are its family's own."""
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    y = (data.get("inputs") or {}).get("y")
    if key.endswith("accuracy"):
        return "fraction correct"
    if model.get("loss") and y:
        return f"{model['loss']} of {y}, data.normalize={data.get('normalize', '?')}"
    return f"{model.get('name', '?')} objective"


def shared_panels(runs: list[RunRecord], max_panels: int = 9) -> dict[str, dict[str, list[dict]]]:
    """'key [unit]' -> {run name: its rows with that key}: one panel per key and unit, for the
    keys two runs or more log in one unit; runs never share a panel across units."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        keys = dict.fromkeys(k for row in run.rows for k, v in row.items()
                             if k.startswith(("train/", "val/")) and isinstance(v, (int, float)))
        for key in keys:
            label = f"{key} [{unit_of(run, key)}]"
            groups.setdefault(label, {})[run.name] = [
                {"_step": r["_step"], label: r[key]} for r in run.rows if key in r]
    shared = {k: v for k, v in groups.items() if len(v) > 1}
    order = sorted(shared, key=lambda k: (not k.startswith("train/"), "loss" not in k, k))
    return {k: shared[k] for k in order[:max_panels]}


def all_runs_section(runs: list[RunRecord]) -> list[str]:
    panels = shared_panels(runs)
    if not panels:
        return ["<h2>All runs</h2>", "<p class=note>no metric is logged in one unit by two of these "
                "runs (their losses differ in kind, target or scaling); each run's curves are below</p>"]
    by_run: dict[str, list[dict]] = {}
    for label, runs_rows in panels.items():
        for name, rows in runs_rows.items():
            by_run.setdefault(name, []).extend(rows)
    fig = figures.loss_curves(by_run, list(panels))
    return ["<h2>All runs</h2>", img(figures.to_png(fig), "each panel one metric in one unit; "
                                     "runs whose values are in other units are not drawn in it")]


# --------------------------------------------------------------------------- page
def img(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def run_section(run: RunRecord) -> str:
    parts = [f"<h2>{html.escape(run.name)}</h2>",
             f"<p class=meta>{html.escape(str(run.train_dir))} &middot; {html.escape(run.origin)}"
             f" &middot; {len(run.rows)} logged rows</p>",
             "<h3>Loss curves</h3>", img(figures.to_png(figures.loss_curves({run.name: run.rows})),
                                         "train/ and val/ metrics per step")]
    shares = figures.step_time_shares(run.rows)  # train.profile=steps|trace (issue 28)
    if shares is not None:
        parts += ["<h3>Where step time went</h3>",
                  img(figures.to_png(shares), "each rank's share of step time, mean of the log lines")]
    if run.images:
        parts.append("<h3>Latest samples</h3>")
        parts += [img(p.read_bytes(), f"{k} (last logged)") for k, p in sorted(run.images.items())
                  if p.is_file()]
    for ev in run.evals:
        pngs = [(k, Path(p)) for k, p in ev.get("figures", {}).items() if Path(p).is_file()]
        what = {"explain": "Attributions", "attack": "Attacks"}.get(ev.get("kind"), "Evaluation")
        parts.append(f"<h3>{what} of {html.escape(Path(ev['checkpoint']).name)} "
                     f"(step {ev['step']}, {html.escape(ev['split'])} split)</h3>")
        parts += [img(p.read_bytes(), k) for k, p in pngs]
        parts += [f"<p class=note>{html.escape(n)}</p>" for n in ev.get("notes", [])]
    cfg = html.escape(json.dumps(run.config, indent=1, default=str))
    parts.append(f"<details><summary>config</summary><pre>{cfg}</pre></details>")
    return "<section>" + "\n".join(parts) + "</section>"


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}
td:not(:first-child){text-align:right;font-family:monospace}th{background:#f0f0f0}
figure{display:inline-block;margin:6px;vertical-align:top}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:12px;color:#555}.meta,.note{color:#666;font-size:13px}
section{border-top:2px solid #ddd;margin-top:1.5em}pre{font-size:11px}
.met{color:#176f2c;font-weight:bold}.unmet{color:#b3261e;font-weight:bold}
td.ref{text-align:left;font-family:sans-serif;color:#555}"""

# Counts the images that decoded, for tests and for a reader wondering whether the page is whole.
SCRIPT = """window.addEventListener('load',function(){var n=0;for(var i of document.images){
if(i.complete&&i.naturalWidth>0)n++;}document.body.setAttribute('data-images-loaded',n);});"""


def render(runs: list[RunRecord]) -> str:
    """The answer first (issue 24): a scorecard per run, then the figures, then every metric's
    final value, folded."""
    parts = [f"<h1>hpcforge report: {len(runs)} run{'s' * (len(runs) > 1)}</h1>",
             "<h2>Scorecard</h2>", *(scorecard(r) for r in runs)]
    if len(runs) > 1:
        parts += all_runs_section(runs)
    parts += [run_section(r) for r in runs]
    parts += ["<details><summary>All metrics (final values)</summary>", metrics_table(runs),
              "</details>"]
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>hpcforge report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script>"
            f"</body></html>")


def report(run_dirs: list[str | Path], out: str | Path = "report.html") -> Path:
    """Write the page for `run_dirs` to `out` (atomically) and return its path."""
    runs = [read_run(d) for d in run_dirs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(render(runs))
    os.replace(tmp, out)
    return out
