"""`hpcforge report` opened in a real headless Chromium: every plot decodes, nothing is fetched."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # needs the trained runs of conftest (~1 min the first time)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt when missing (the test needs the real browser).

    A fresh machine may have empty or stale package lists (`make setup` refreshes them only when it
    installs OpenMPI itself), so a failed install is retried once after `apt-get update`."""
    if shutil.which("chromium") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
        r = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
            r = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, f"could not install chromium with apt: {r.stderr[-1500:]}"
    path = shutil.which("chromium")
    assert path, "apt installed chromium but `chromium` is not on PATH"
    return path


def browse(chromium: str, tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(vae_run, ae_run, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    vae_dir, ae_dir = vae_run[0].parent.parent.parent, ae_run[0].parent.parent   # output_dir, train/
    r = cli("report", str(vae_dir), str(ae_dir), "--out", str(out))
    assert r.returncode == 0 and str(out) in r.stdout, r.stderr[-2000:]
    return out, vae_run, ae_run


def expected_plots(vae_run, ae_run) -> int:
    """Per run: its loss curves, its latest W&B images, its eval figures. No plot of all runs:
    a VAE's and an autoencoder's objectives are not one unit (test_all_runs_panels_never_mix_units)."""
    vae_images = {p.name.split("_")[0] for p in
                  vae_run[0].parent.parent.glob("wandb/offline-run-*/files/media/images/images/*.png")}
    return (1 + len(vae_images) + len(vae_run[2]["figures"])) + (1 + 0 + len(ae_run[2]["figures"]))


def test_page_is_self_contained(page):
    text = page[0].read_text()
    assert "http://" not in text and "https://" not in text   # nothing to fetch on an air-gapped node
    assert not re.search(r'<(link|script)[^>]+(href|src)=', text)
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_report_renders_every_plot_in_chromium(page, chromium, tmp_path):
    out, vae_run, ae_run = page
    r = browse(chromium, tmp_path, out, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    n_img = len(re.findall(r"<img ", r.stdout))
    loaded = re.search(r'data-images-loaded="(\d+)"', r.stdout)
    assert loaded, "the page's load handler did not run"
    assert n_img == int(loaded.group(1)) == expected_plots(vae_run, ae_run)
    # both runs, their final metrics and the evaluation metrics in the table
    for text in ("val/elbo", "eval/frechet_distance", "eval/anomaly_roc_auc", "metrics.jsonl (no W&amp;B run)",
                 f"W&amp;B offline run {vae_run[2]['wandb_run_id']}"):
        assert text in r.stdout, text


def test_report_screenshot_is_not_blank(page, chromium, tmp_path):
    shot = tmp_path / "report.png"
    r = browse(chromium, tmp_path, page[0], "--window-size=1280,2400", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    # ink, not an empty white page (a blank page has none; this report has ~5 %: white-background plots)
    assert (img < 250).any(axis=2).mean() > 0.02
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100    # plots, not a flat colour


def test_report_of_a_folder_without_runs_is_one_line(cli, tmp_path):
    r = cli("report", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert r.returncode == 2 and "no W&B run files" in r.stderr and "Traceback" not in r.stderr
    r = cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no run folder at" in r.stderr


def test_wandb_record_reader_checks_each_chunks_crc(tmp_path):
    """tests/wandb_records.py (what the tests use to see what reached W&B) refuses a damaged chunk."""
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb
    from wandb_records import HEADER, history
    rec = pb.Record()
    item = rec.history.item.add()
    item.key, item.value_json = "train/loss", "0.25"
    data = rec.SerializeToString()
    chunk = struct.pack("<IHB", zlib.crc32(bytes([1]) + data), len(data), 1) + data
    path = tmp_path / "run-x.wandb"
    path.write_bytes(HEADER + chunk)
    assert history(path) == [{"train/loss": 0.25}]
    path.write_bytes(HEADER + chunk[:-1] + bytes([chunk[-1] ^ 1]))
    with pytest.raises(ValueError, match="CRC mismatch"):
        history(path)


# ------------------------------------------------------------------ the answer first (issue 24)
def _run(name: str, model: dict, y: str | None, metrics: dict | None, steps: int = 4):
    from pipeline.analysis.report import RunRecord
    rows = [{"_step": s, "step": s, "train/model/loss": 1.0 / s, "val/loss": 1.2 / s}
            for s in range(1, steps + 1)]
    evals = [] if metrics is None else [{"checkpoint": f"/x/{name}/final.pt", "step": steps,
                                         "split": "test", "metrics": metrics, "notes": []}]
    config = {"model": model, "data": {"inputs": {"x": "a", **({"y": y} if y else {})},
                                       "normalize": "standard"}}
    return RunRecord(name, Path(f"/x/{name}/train"), "metrics.jsonl (no W&B run)", rows, config, {}, evals)


RUNS = {
    "pid": ({"name": "tower", "loss": "ce"}, "label",
            {"accuracy": 0.91, "accuracy_majority": 0.34, "accuracy_chance": 1 / 3, "samples": 60}),
    "pid-cnn": ({"name": "cnn", "loss": "ce"}, "label",
                {"accuracy": 0.30, "accuracy_majority": 0.34, "accuracy_chance": 1 / 3}),
    "energy": ({"name": "tower", "loss": "mse"}, "energy",
               {"rmse": 3.1, "rmse_baseline": 25.0, "r2": 0.98}),
    "gan": ({"name": "dcgan"}, None, {"w1_ratio/m": 1.4, "w1_ratio/E": 3.2,
                                       "classifier/auc": 0.55, "classifier/auc_reference": 0.5}),
    "vae": ({"name": "vae"}, None, None),
}


def test_scorecard_marks_each_verdict_metric_met_or_not_against_its_reference():
    from pipeline.analysis.report import checks
    got = {name: [(c.what, c.met) for c in checks(m)] for name, (_, _, m) in RUNS.items() if m}
    assert got == {"pid": [("accuracy", True)], "pid-cnn": [("accuracy", False)],
                   "energy": [("RMSE (target's units)", True)],
                   "gan": [("W1 / floor, E", False), ("W1 / floor, m", True),
                           ("classifier AUC, generated vs real", True)]}


def test_report_puts_scorecards_first_then_figures_then_the_raw_table_folded():
    from pipeline.analysis.report import render
    page = render([_run(n, *spec) for n, spec in RUNS.items()])
    card, first_img = page.index("<h2>Scorecard</h2>"), page.index("<img ")
    raw = page.index("<details><summary>All metrics (final values)</summary>")
    assert card < first_img < raw
    assert page.index("<table><tr><th>metric (final value)") > raw    # the raw table is folded
    cards = page[card:first_img]
    assert cards.count("<td class=met>met</td>") == 4 and cards.count(">not met</td>") == 2
    assert "predicting the train mean 25" in cards and "most common class 0.34" in cards
    assert "not evaluated: run <code>hpcforge evaluate" in cards      # the vae


def test_all_runs_panels_never_mix_units():
    """The issue's report overlaid GeV² MSE, cross-entropy and standardised MSE on one axis:
    every run logs train/model/loss, in the unit of its own loss and target."""
    from pipeline.analysis.report import shared_panels
    runs = [_run(n, *spec) for n, spec in RUNS.items()]
    panels = shared_panels(runs)
    loss = [k for k in panels if k.startswith("train/model/loss")]
    assert loss == ["train/model/loss [ce of label, data.normalize=standard]"]
    assert set(panels[loss[0]]) == {"pid", "pid-cnn"}                 # the two classifiers only
    for label, by_run in panels.items():
        units = {next(k for k in rows[0] if k != "_step") for rows in by_run.values()}
        assert units == {label}
    assert not shared_panels([runs[2], runs[3]])                       # mse of energy vs a GAN
