"""Quality per incident-energy bin (pipeline/analysis/binned.py, issue #15): the per-bin W1, its floor and
the response equal a hand computation, on arrays and on a real calo store through evaluate's
method; and `hpcforge evaluate` of a trained calo WGAN-GP reports them with the response figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from pipeline import physics
from pipeline.analysis import binned
from pipeline.sources import calo

TINY = ["data.path={}", "data.n_samples=320", "data.chunk_size=64", "data.shard_size=0",
        "data.params.layers=4", "data.params.eta=8", "data.params.phi=8", "data.dask.n_workers=1",
        "data.dask.progress=false", "model.data_shape=[4,8,8]", "model.g_hidden=[16]",
        "model.d_hidden=[16]", "model.latent_dim=4", "model.n_critic=1"]


def manual(real, real_cond, gen, ref, ref_cond, n_bins):
    """Per bin (W1 real vs generated, W1 real vs reference), bins at quantiles of real_cond; the
    end bins open-ended (reference conditions beyond the real ones join them)."""
    e = np.quantile(real_cond, np.linspace(0, 1, n_bins + 1))
    def which(c, k):
        return ((c >= e[k]) | (k == 0)) & ((c < e[k + 1]) | (k == n_bins - 1))
    return e, [(wasserstein_distance(real[which(real_cond, k)], gen[which(real_cond, k)]),
                wasserstein_distance(real[which(real_cond, k)], ref[which(ref_cond, k)]))
               for k in range(n_bins)]


def test_per_bin_w1_floor_and_response_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    cond, ref_cond = np.exp(rng.uniform(0, 4.6, 300)), np.exp(rng.uniform(0, 4.6, 300))
    real = {"total": 0.2 * cond * (1 + 0.05 * rng.standard_normal(300))}
    gen = {"total": 0.25 * cond}           # a 25 % response where the data has 20 %
    ref = {"total": 0.2 * ref_cond * (1 + 0.05 * rng.standard_normal(300))}
    spec = binned.ConditionBins(n_bins=3, response="total")
    out = binned.evaluate_bins(spec, real, cond, gen, ref, ref_cond)
    edges, expected = manual(real["total"], cond, gen["total"], ref["total"], ref_cond, 3)
    for k, (w1, floor) in enumerate(expected):
        assert out.metrics[f"w1_bin/{k}/total"] == pytest.approx(w1, rel=1e-12)
        assert out.metrics[f"w1_reference_bin/{k}/total"] == pytest.approx(floor, rel=1e-12)
        assert out.metrics[f"w1_ratio_bin/{k}/total"] == pytest.approx(w1 / floor, rel=1e-12)
        assert out.metrics[f"bin/{k}/low"] == edges[k] and out.metrics[f"bin/{k}/high"] == edges[k + 1]
        assert out.metrics[f"response_bin/{k}/generated"] == pytest.approx(0.25)
        assert out.metrics[f"response_bin/{k}/real"] == pytest.approx(0.2, abs=0.01)
        assert out.metrics[f"response_bin/{k}/ratio"] == pytest.approx(1.25, abs=0.07)
    assert np.isclose(out.metrics["w1_bin/2/total"], expected[2][0]) and expected[2][0] > 3 * expected[2][1]
    assert "total 1" not in binned.summary(out) and "response generated / real" in binned.summary(out)


def test_every_sample_falls_in_one_bin_the_last_holding_the_maximum():
    cond = np.arange(10.0)
    e = binned.edges(cond, 4)
    k = binned.index(cond, e)
    assert k.min() == 0 and k.max() == 3 and np.bincount(k).tolist() == [3, 2, 2, 3]
    assert binned.index(np.array([-5.0, 50.0]), e).tolist() == [0, 3]


def showers_scalars(cond, rng, widen=1.0):
    """Scalars of a toy shower per condition: depth grows like ln E, width fluctuates."""
    n = len(cond)
    return {"shower_depth": np.log(cond) + 0.5 * rng.standard_normal(n),
            "shower_width": 2.0 + 0.3 * widen * rng.standard_normal(n)}


def test_bin_ratios_intervals_tell_a_perfect_sampler_from_one_with_wrong_fluctuations():
    """A third real sample scores about 1 with an interval covering 1 in every bin; a sampler
    whose widths fluctuate 1.6x too much is > 2x the floor with its whole interval above the
    perfect one's, and the verdict says the perfect sampler beats it clearly on width only."""
    rng = np.random.default_rng(3)
    cond, ref_cond = np.exp(rng.uniform(0, 4.6, (2, 1200)))
    real, ref = showers_scalars(cond, rng), showers_scalars(ref_cond, rng)
    e = binned.edges(cond, 4)
    in_real, in_ref = binned.index(cond, e), binned.index(ref_cond, e)
    perfect = binned.BinScores("perfect", binned.bin_ratios(real, showers_scalars(cond, rng), ref,
                                                            in_real, in_ref, 4), (0.5, 0.47, 0.53))
    wide = binned.BinScores("too wide", binned.bin_ratios(real, showers_scalars(cond, rng, 1.6), ref,
                                                          in_real, in_ref, 4), (0.7, 0.67, 0.73))
    for name in real:
        v, lo, hi = perfect.ratio[name].T
        assert np.all((lo < 1) & (1 < hi) & (lo < v) & (v < hi)), (name, perfect.ratio[name])
        assert np.all(hi / lo < 5), perfect.ratio[name]   # about 300 per bin: wide near 1
    assert np.all(wide.ratio["shower_width"][:, 0] > 2)
    assert np.all(wide.ratio["shower_width"][:, 1] > perfect.ratio["shower_width"][:, 2])
    said = binned.verdict(perfect, [wide])
    assert said.startswith("met (W1 within 2x the floor in every bin on shower_depth and shower_width")
    assert "beats 'too wide' clearly in every bin on shower_width" in said
    assert binned.verdict(wide, [perfect]).startswith("not met")
    assert perfect.metrics("bins/p")["bins/p/w1_ratio/3/shower_width_hi"] == perfect.ratio["shower_width"][3, 2]


def test_the_floor_averages_resplits_of_the_two_real_samples():
    """floor() is the mean over re-splits of W1 between parts of the pooled samples' sizes; with
    one re-split and a known permutation it is that split's W1."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=70)
    pooled = np.concatenate([a, b])
    p = np.random.default_rng(5).permutation(pooled)
    assert binned.floor(a, b, np.random.default_rng(5), 1) == pytest.approx(
        wasserstein_distance(p[:50], p[50:]), rel=1e-12)
    many = binned.floor(a, b, np.random.default_rng(1), 64)
    assert 0 < many < 2 * wasserstein_distance(a, b) + 0.2


def test_mean_shower_control_has_the_bins_mean_response_and_profile_and_no_fluctuation():
    """Every control shower at E is E x the mean of (train shower / its E) over E's bin: by hand
    for two conditions in different bins; its depth is one value per bin."""
    rng = np.random.default_rng(0)
    train_cond = np.exp(rng.uniform(0, 4.6, 200))
    train = rng.gamma(2.0, 1.0, (200, 4, 8, 8)) * train_cond[:, None, None, None]
    e = binned.edges(train_cond, 4)
    cond = np.array([1.5, 90.0, 2.0])
    out = binned.mean_shower(train, train_cond, cond, e)
    k = binned.index(train_cond, e)
    for i, b in ((0, 0), (1, 3)):
        by_hand = cond[i] * (train / train_cond[:, None, None, None])[k == b].mean(0)
        np.testing.assert_allclose(out[i], by_hand, rtol=1e-12)
    depth = physics.shower_depth(out)
    assert depth[0] == pytest.approx(depth[2]) and depth[0] != pytest.approx(depth[1])


@pytest.fixture(scope="module")
def calo_run(tmp_path_factory, cli):
    """A tiny calo store, the calo WGAN-GP trained 6 steps on it and evaluated, by the real CLI."""
    out = tmp_path_factory.mktemp("calo")
    tiny = [o.format(out / "calo.zarr") for o in TINY]
    r = cli("prepare", "-e", "wgan_gp_calo", *tiny)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = cli("train", "-e", "wgan_gp_calo", f"output_dir={out}", *tiny, "train.max_steps=6",
            "train.batch_size=32", "train.logger.mode=disabled", "train.dist.backend=none")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ckpt = out / "train" / "checkpoints" / "final.pt"
    r = cli("evaluate", str(ckpt))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out / "calo.zarr", r, json.loads(ckpt.with_name("final.eval.json").read_text())


@pytest.mark.slow
def test_evaluate_reports_floors_and_response_per_energy_bin_of_a_real_store(calo_run):
    """The floors, bin edges and real response in evaluate's JSON equal the same computed by hand
    from the store's test and train splits; the generated side is there and the figure is drawn."""
    from pipeline.data.store import open_store
    path, r, result = calo_run
    store = open_store(path)
    x, c = (np.asarray(store.variable("test", v)[:]) for v in ("energy_deposits", "incident_energy"))
    n = len(x)
    tx, tc = (np.asarray(store.variable("train", v)[:n]) for v in ("energy_deposits", "incident_energy"))
    m = result["metrics"]
    for name, f in physics.shower_scalars(np.zeros((1, 4, 8, 8))).items():
        real, ref = physics.shower_scalars(x)[name], physics.shower_scalars(tx)[name]
        edges, expected = manual(real, c, real, ref, tc, 4)
        for k, (_, floor) in enumerate(expected):
            assert m[f"w1_reference_bin/{k}/{name}"] == pytest.approx(floor, rel=1e-9)
            assert m[f"w1_ratio_bin/{k}/{name}"] == pytest.approx(m[f"w1_bin/{k}/{name}"] / floor)
            assert m[f"bin/{k}/low"] == pytest.approx(edges[k])
    e = binned.edges(c, 4)
    k = binned.index(c, e)
    for b in range(4):
        real_response = (physics.shower_total_energy(x) / c)[k == b].mean()
        assert m[f"response_bin/{b}/real"] == pytest.approx(real_response, rel=1e-9)
        # untrained for 6 steps the ratio is still near its start, 0.2, the source's sampling fraction
        assert m[f"response_bin/{b}/generated"] == pytest.approx(0.2, rel=0.1)
    assert "W1 / floor, worst of 4 condition bins" in r.stdout
    assert result["figures"]["response"].endswith("response.png")
    assert calo.CONDITION_BINS.response in physics.shower_scalars(x)


@pytest.mark.slow
def test_evaluate_reports_intervals_and_no_network_controls_per_energy_bin(calo_run):
    """Beside the model, evaluate scores the untrained network and the bins' mean shower the
    same way: every per-bin ratio inside its 95 % interval, AUCs with intervals (the model's
    equal to classifier/auc), a line naming all three, a verdict line and the per-bin figure."""
    _, r, result = calo_run
    m = result["metrics"]
    for key in ("model", "untrained", "mean_shower"):
        for k in range(4):
            for name in ("total_energy", "shower_depth", "shower_width"):
                v = m[f"bins/{key}/w1_ratio/{k}/{name}"]
                assert m[f"bins/{key}/w1_ratio/{k}/{name}_lo"] <= v <= m[f"bins/{key}/w1_ratio/{k}/{name}_hi"]
        assert m[f"bins/{key}/auc_lo"] <= m[f"bins/{key}/auc"] <= m[f"bins/{key}/auc_hi"]
    assert m["bins/model/auc"] == pytest.approx(m["classifier/auc"], abs=1e-12)
    line = next(n for n in result["notes"] if n.startswith("per condition bin"))
    assert "the same network untrained:" in line and "no network: the bin's mean shower x E:" in line
    assert any(n.startswith("verdict: ") and "beats 'the same network untrained'" in n
               for n in result["notes"])
    assert result["figures"]["ratio_per_bin"].endswith("ratio_per_bin.png")
