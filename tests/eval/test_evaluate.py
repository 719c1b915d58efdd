"""`hpcforge evaluate` on real checkpoints of real runs: metrics against direct NumPy computations,
the W&B run resumed by id, and one-line errors for bad checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import roc_auc_score
from wandb_records import history, records

from pipeline.config import Config, build
from pipeline.core.checkpoint import load
from pipeline.data.store import open_store
from tests.eval.conftest import evaluate, train

pytestmark = pytest.mark.slow  # trains and evaluates real models through the CLI (~1 min)


def test_vae_metrics_json_holds_elbo_w1_and_frechet(vae_run):
    ckpt, r, result = vae_run
    m = result["metrics"]
    assert result["split"] == "val" and "evaluating on the val split instead" in r.stdout
    assert m["elbo"] == pytest.approx(-(m["recon"] + m["kl"]), rel=1e-6)
    assert m["samples"] == 128                                    # the whole val split
    for obs in ("magnetization", "abs_magnetization", "energy"):
        assert m[f"w1/{obs}"] >= 0 and m[f"w1_reference/{obs}"] >= 0
        assert m[f"w1_ratio/{obs}"] == pytest.approx(m[f"w1/{obs}"] / m[f"w1_reference/{obs}"])
    assert f"energy {m['w1_ratio/energy']:.2f}x" in r.stdout.split("W1 / real-vs-real floor")[1]
    assert m["frechet_distance"] > 0 and m["frechet_reference"] >= 0
    for name in ("observables", "profiles"):
        png = Path(result["figures"][name])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.parent.name == "final.eval"


def test_reference_w1_equals_scipy_on_the_stores_own_observables(vae_run):
    """w1_reference compares the eval split with the train split; the Ising source stored each
    sample's magnetisation and energy, so SciPy on those arrays must give the same numbers."""
    ckpt, _, result = vae_run
    cfg = build(Config, load(ckpt)["config"], "")
    store = open_store(cfg.data.path)
    n = result["metrics"]["samples"]
    for obs in ("magnetization", "energy"):
        val, train = store.variable("val", obs)[:n], store.variable("train", obs)[:n]
        assert result["metrics"][f"w1_reference/{obs}"] == pytest.approx(
            scipy.stats.wasserstein_distance(val, train), abs=1e-6)


def test_evaluation_resumes_the_checkpoints_wandb_run(vae_run):
    ckpt, r, result = vae_run
    run_id = load(ckpt)["wandb_run_id"]
    runs = sorted((ckpt.parent.parent / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)   # same id, resumed
    assert result["wandb_run"] == str(runs[-1]) and f"run id {run_id}" in r.stdout
    rows = history(runs[-1] / f"run-{run_id}.wandb")
    logged = {k: v for row in rows for k, v in row.items()}
    for k, v in result["metrics"].items():
        assert logged[f"eval/{k}"] == pytest.approx(v)
    assert logged["eval_figures/observables/_type"] == "image-file"
    summary = {item.key: json.loads(item.value_json) for rec in records(runs[-1] / f"run-{run_id}.wandb")
               if rec.WhichOneof("record_type") == "summary" for item in rec.summary.update}
    assert summary["eval/frechet_distance"] == pytest.approx(result["metrics"]["frechet_distance"])


def test_feature_extractor_is_cached_next_to_the_store_and_reused(vae_run, cli):
    ckpt, _, _ = vae_run
    cfg = build(Config, load(ckpt)["config"], "")
    cache = Path(cfg.data.path + ".features.pt")
    stamp = cache.stat().st_mtime_ns
    r = cli("evaluate", str(ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "feature extractor: trained" not in r.stdout and cache.stat().st_mtime_ns == stamp
    assert set(load(cache)) == {"model", "shape", "key"}


def test_autoencoder_reconstruction_error_and_anomaly_auc_equal_direct_computations(ae_run):
    """Rebuild the model, score the same val samples and the same out-of-distribution samples
    (hotter Ising lattices) directly, and compare with the JSON."""
    from pipeline.sources import ising2d
    from pipeline.train.trainer import build_model
    ckpt, _, result = ae_run
    state = load(ckpt)
    cfg = build(Config, state["config"], "")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    store = open_store(cfg.data.path)
    x = (store.variable("val", "spins")[:].astype(np.float32) + 1) / 2     # minmax of -1/+1 spins
    ood = ising2d.generate(ising2d.out_of_distribution(cfg.data.params), seed=cfg.data.seed + 1,
                           chunk_index=0, start=0, n=256)["spins"].astype(np.float32)
    ood = (ood + 1) / 2
    with torch.no_grad():
        rec = torch.sigmoid(model(torch.as_tensor(x))[0]).numpy()
        rec_ood = torch.sigmoid(model(torch.as_tensor(ood))[0]).numpy()
    err, err_ood = ((rec - x) ** 2).mean((1, 2, 3)), ((rec_ood - ood) ** 2).mean((1, 2, 3))
    m = result["metrics"]
    assert m["reconstruction_error"] == pytest.approx(err.mean(), rel=1e-5)
    auc = roc_auc_score(np.r_[np.zeros(len(err)), np.ones(len(err_ood))], np.r_[err, err_ood])
    assert m["anomaly_roc_auc"] == pytest.approx(auc, abs=1e-6)
    assert m["anomaly_roc_auc"] > 0.7     # hot lattices reconstruct worse than those seen in training
    assert "no W&B run to log to" in " ".join(result["notes"]) and result["wandb_run"] is None


def test_classifier_accuracy_equals_argmax_over_the_test_split(tmp_path, cli):
    """A CNN on the real digits, with a test split: accuracy and the confusion matrix."""
    common = [f"output_dir={tmp_path}", "data.source=digits", "data.params=null",
              "data.n_samples=640", "data.chunk_size=64", "data.shard_size=128",
              "data.test_fraction=0.2", "data.dask.progress=false", "data.inputs={x: image, y: label}"]
    assert cli("prepare", *common).returncode == 0
    r = cli("train", *common, "model=cnn", "model.channels=[8,16]", "train.epochs=4",
                 "train.lr=0.01", "train.dist.backend=none", "train.dist.nproc=1",
                 "train.batch_size=32", "train.logger.mode=disabled")
    assert r.returncode == 0, r.stderr[-2000:]
    from pipeline.train.trainer import build_model
    ckpt = tmp_path / "train" / "checkpoints" / "final.pt"
    r = cli("evaluate", str(ckpt))
    assert r.returncode == 0 and "val split instead" not in r.stdout, r.stderr[-2000:]
    result = json.loads(ckpt.with_name("final.eval.json").read_text())
    state = load(ckpt)
    model = build_model(build(Config, state["config"], ""))
    model.load_state_dict(state["model"])
    store = open_store(tmp_path / "data" / "digits.zarr")
    x, y = store.variable("test", "image")[:], store.variable("test", "label")[:]
    with torch.no_grad():
        pred = model.eval()(torch.as_tensor(x)).argmax(1).numpy()   # digits are stored in [0, 1]
    assert result["split"] == "test" and result["metrics"]["samples"] == 128
    assert result["metrics"]["accuracy"] == pytest.approx(np.mean(pred == y), abs=1e-6)
    assert result["metrics"]["accuracy"] > 0.3                      # 10 classes: chance is 0.1
    assert Path(result["figures"]["confusion_matrix"]).is_file()


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04truncated zip"])
def test_missing_or_corrupt_checkpoint_is_one_line_naming_it(tmp_path, content, cli):
    path = tmp_path / "final.pt"
    if content is not None:
        path.write_bytes(content)
    r = cli("evaluate", str(path))
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("hpcforge: error: ") and str(path) in line
    assert ("no checkpoint at" if content is None else "not a readable hpcforge checkpoint") in line


def test_checkpoint_without_config_is_refused(tmp_path, cli):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}}, path)
    r = cli("evaluate", str(path))
    assert r.returncode == 2 and "missing config, step" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_temperature_conditional_generator_is_compared_on_the_thermodynamic_curves(small_store,
                                                                                     tmp_path):
    """A conditional DCGAN (issue #15) gets <|m|>, <E>, C and chi against T, real vs generated at
    the test samples' own temperatures: one error per curve and the figure, beside the W1s."""
    from pipeline.physics import thermo
    ckpt = train(small_store, tmp_path, "model=dcgan", "model.image_size=16",
                 "model.channels=[16,8]", "model.cond_temperature=true", "model.circular=true",
                 "model.refine_sweeps=2", "train.max_steps=6", "train.logger.mode=disabled")
    r, result = evaluate(ckpt, "--per-t", "8")
    m = result["metrics"]
    for q in thermo.QUANTITIES:
        assert 0.0 <= m[f"thermo/{q}"] < float("inf"), (q, m)
    assert "w1/energy" in m and "w1/abs_magnetization" in m
    png = Path(result["figures"]["thermo_curves"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # issue #23: the precise evaluation beside its controls, at 8 lattices per temperature
    # (the 16x16 store's 16 training temperatures and the 15 midpoints held out of training)
    assert m["precise/samples"] == 8 * 31 and m["precise/temperatures"] == 31
    for who in ("model", "network_only", "control"):
        value, lo, hi = (m[f"precise/{who}/w1_ratio/energy{s}"] for s in ("", "_lo", "_hi"))
        assert 0 < lo <= value <= hi, (who, value, lo, hi)
        assert 0 <= m[f"precise/{who}/auc"] <= 1
    # the network alone samples its probabilities with no sweeps: far from equilibrium after 6
    # steps, where the source's start plus 2 sweeps is nearer
    assert m["precise/network_only/w1_ratio/energy"] > m["precise/control/w1_ratio/energy"]
    verdict = [n for n in result["notes"] if n.startswith("verdict: ")]
    assert len(verdict) == 1 and "not met" in verdict[0] and "no network" in verdict[0]
    assert len(result["per_temperature"]["T"]) == 31
    assert Path(result["figures"]["per_temperature"]).read_bytes()[:4] == b"\x89PNG"
    assert "[hpcforge] note: verdict: " in r.stdout


def test_an_unconditional_generator_gets_no_curves_over_the_condition(vae_run):
    """The demo's VAE ignores the store's temperatures: curves "at" them would compare nothing."""
    _, _, result = vae_run
    assert "w1/energy" in result["metrics"]
    assert not [k for k in result["metrics"] if k.startswith("thermo/")]
    assert "thermo_curves" not in result["figures"]


def test_a_neural_mcmc_sampler_is_shown_beside_the_network_alone_and_the_same_cost_metropolis(
        small_store, tmp_path):
    """An autoregressive model with a Metropolis-Hastings correction (issue #23): the precise
    evaluation reports its acceptance rate and ESS / N at each of the 31 temperatures, its CPU
    time per sample, the network with no correction, and the no-network control run for as many
    sweeps as the model's CPU time buys (its CPU time within a factor 2 of the model's); the
    verdict line names the corrected sampler and both controls."""
    ckpt = train(small_store, tmp_path, "model=autoregressive", "model.image_size=16",
                 "model.columns=4", "model.hidden=8", "model.embed=4", "model.kernel=3",
                 "train.max_steps=4", "train.logger.mode=disabled")
    r, result = evaluate(ckpt, "model.mh_steps=3", "--per-t", "4")
    m, per_t = result["metrics"], result["per_temperature"]
    for k in ("acceptance", "ess_per_n"):
        values = np.array(per_t[f"model/mh/{k}"])
        assert len(values) == 31 and ((values >= 0) & (values <= 1)).all(), (k, values)
    assert 0 <= m["precise/model/mh_acceptance"] <= 1
    assert m["precise/model/mh_ess_per_n_min"] <= m["precise/model/mh_ess_per_n_max"]
    assert "precise/network_only/mh_acceptance" not in m
    assert m["precise/control/sweeps"] >= 1
    assert m["precise/model/cpu_s_per_sample"] == pytest.approx(m["precise/model/cpu_s"] / (4 * 31))
    assert 0.5 < m["precise/control/cpu_s"] / m["precise/model/cpu_s"] < 2.0, m
    (verdict,) = [n for n in result["notes"] if n.startswith("verdict: ")]
    assert "neural MCMC: 3 Metropolis-Hastings proposals" in verdict
    assert "beats 'network alone (no correction)'" in verdict and "model's CPU time" in verdict
