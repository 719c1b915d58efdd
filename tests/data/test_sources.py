"""Dataset generators: the contract (variables, shapes, dtypes, purity) and each one's physics."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.core.errors import ConfigError
from pipeline.sources import SOURCES, calo, darcy2d, digits, lorenz96

# (source, Params overrides): defaults, plus the other mode / interpolation where there is one
CASES = [
    ("darcy2d", {}),
    ("calo", {}),
    ("lorenz96", {}),
    ("lorenz96", {"mode": "trajectory", "trajectory_length": 200}),
    ("digits", {}),
    ("digits", {"size": 32, "interpolation": "bilinear"}),
]
IDS = [name + "".join(f"-{v}" for v in over.values()) for name, over in CASES]


def _run(name: str, over: dict, seed: int = 3, chunk: int = 1, n: int = 6):
    src = SOURCES[name]
    p = src.Params(**over)
    return src, p, src.generate(p, seed, chunk, chunk * n, n)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name, over", CASES, ids=IDS)
def test_generate_returns_declared_variables(name, over):
    src, p, out = _run(name, over)
    declared = src.variables(p)
    assert set(out) == set(declared)
    for key, var in declared.items():
        assert out[key].shape == (6, *var.shape), key
        assert out[key].dtype == np.dtype(var.dtype), key
        assert var.description
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(src.Params))


@pytest.mark.parametrize("name, over", CASES, ids=IDS)
def test_generate_is_a_pure_function_of_seed_and_chunk(name, over):
    _, _, a = _run(name, over)
    _, _, b = _run(name, over)
    _, _, other_chunk = _run(name, over, chunk=2)
    _, _, other_seed = _run(name, over, seed=4)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key   # bit-identical
    assert any(not np.array_equal(a[k], other_chunk[k]) for k in a)
    assert any(not np.array_equal(a[k], other_seed[k]) for k in a)


# --------------------------------------------------------------------------- darcy2d
def poisson_centre_value(terms: int = 400) -> float:
    """u(1/2, 1/2) of -Laplacian u = 1 on the unit square, u = 0 on its boundary (sine series)."""
    m = np.arange(1, 2 * terms, 2)
    mm, nn = np.meshgrid(m, m)
    signs = (-1.0) ** ((mm - 1) // 2 + (nn - 1) // 2)   # sin(m pi / 2) sin(n pi / 2)
    return float((16 / np.pi**4 * signs / (mm * nn * (mm**2 + nn**2))).sum())


def test_darcy_pressure_solves_the_discrete_system():
    out = darcy2d.generate(darcy2d.Params(), seed=0, chunk_index=0, start=0, n=4)
    for a32, u32 in zip(out["permeability"][:, 0], out["pressure"][:, 0]):
        a = a32.astype(np.float64)
        A, b = darcy2d.assemble(a)
        u = darcy2d.solve(a)
        assert abs(A - A.T).max() == 0                     # symmetric, as finite volumes give
        assert np.linalg.norm(A @ u[1:-1, 1:-1].ravel() - b) / np.linalg.norm(b) < 1e-8
        assert np.array_equal(u.astype(np.float32), u32)  # the stored pressure is this solution
        assert (u32[0] == 0).all() and (u32[-1] == 0).all()
        assert (u32[:, 0] == 0).all() and (u32[:, -1] == 0).all()
        assert (u32[1:-1, 1:-1] > 0).all()                 # maximum principle, f > 0


def test_darcy_constant_permeability_gives_the_poisson_solution():
    exact = poisson_centre_value()
    assert exact == pytest.approx(0.0736713, abs=1e-7)   # the known value
    errors = {}
    for s in (33, 65):                                    # odd: a node sits at the centre
        u = darcy2d.solve(np.ones((s, s)))
        c = s // 2
        assert np.unravel_index(u.argmax(), u.shape) == (c, c)
        for sym in (u.T, u[::-1], u[:, ::-1]):
            np.testing.assert_allclose(u, sym, atol=1e-14)
        assert (u[0] == 0).all() and (u[:, 0] == 0).all()
        errors[s] = abs(u[c, c] - exact) / exact
    # h = 1/32: 0.077% observed; the 5-point scheme is second order, so h/2 divides it by ~4
    assert errors[33] < 1e-3
    assert 3.5 < errors[33] / errors[65] < 4.5


def test_darcy_permeability_is_the_thresholded_field():
    out = darcy2d.generate(darcy2d.Params(), seed=0, chunk_index=0, start=0, n=64)
    a = out["permeability"][:, 0]
    assert set(np.unique(a)) == {3.0, 12.0}
    both = [(ai == 3).any() and (ai == 12).any() for ai in a]
    assert all(both)
    # z is a centred Gaussian field, so P(z >= 0) = 1/2
    assert abs((a == 12).mean() - 0.5) < 0.1


@pytest.mark.parametrize("experiment", ["unet_darcy85", "fno_darcy85"])
def test_darcy85_experiments_hold_the_fno_papers_protocol(experiment):
    """Li et al. 2021 (arXiv:2010.08895, sec. 5.2): 85 x 85, 1000 training and 100 test samples."""
    from pipeline.config import load_config
    from pipeline.data.prepare import make_layout
    cfg = load_config(experiment).data
    assert (cfg.source, cfg.params.resolution, cfg.params.forcing) == ("darcy2d", 85, 1.0)
    assert make_layout(cfg).splits == {"train": 1000, "val": 100, "test": 100}
    assert (cfg.inputs, cfg.normalize) == ({"x": "permeability", "y": "pressure"}, "standard")


def test_darcy_at_85_nodes_is_a_solved_thresholded_field():
    out = darcy2d.generate(darcy2d.Params(resolution=85), seed=0, chunk_index=0, start=0, n=2)
    a, u = out["permeability"][:, 0].astype(np.float64), out["pressure"][:, 0].astype(np.float64)
    assert a.shape == u.shape == (2, 85, 85) and set(np.unique(a)) == {3.0, 12.0}
    exact = darcy2d.solve(a[0])
    A, b = darcy2d.assemble(a[0])
    assert np.linalg.norm(A @ exact[1:-1, 1:-1].ravel() - b) / np.linalg.norm(b) < 1e-8
    assert np.array_equal(exact.astype(np.float32), out["pressure"][0, 0])  # what the store holds
    assert (u[:, 0] == 0).all() and (u[:, :, -1] == 0).all() and (u[:, 1:-1, 1:-1] > 0).all()


# --------------------------------------------------------------------------- calo
@pytest.fixture(scope="module")
def showers():
    out = calo.generate(calo.Params(), seed=0, chunk_index=0, start=0, n=1500)
    return out["energy_deposits"].astype(np.float64), out["incident_energy"].astype(np.float64)


def test_calo_response_is_the_sampling_fraction_with_stochastic_spread(showers):
    deposits, energy = showers
    p = calo.Params()
    assert (deposits >= 0).all()
    ratio = deposits.sum(axis=(1, 2, 3)) / energy
    low, high = (energy < 3), (energy > 30)
    assert low.sum() > 200 and high.sum() > 200
    spread = {}
    for name, sel in (("low", low), ("high", high)):
        mean = ratio[sel].mean()
        # leakage behind 28 X0 and beyond +-4 R_M costs < 1% at 100 GeV
        assert mean == pytest.approx(p.sampling_fraction, rel=0.02), name
        spread[name] = ratio[sel].std() / mean
        # sigma/E * sqrt(E) = a: the stochastic term, in each bin
        assert spread[name] * np.sqrt(energy[sel]).mean() == pytest.approx(
            p.stochastic_term, rel=0.15), name
    expected = np.sqrt(energy[high].mean() / energy[low].mean())   # ~ 1 / sqrt(E) scaling
    assert spread["low"] / spread["high"] == pytest.approx(expected, rel=0.2)


def test_calo_mean_depth_grows_with_log_energy(showers):
    deposits, energy = showers
    p = calo.Params()
    profile = deposits.sum(axis=(2, 3))                           # (n, layers)
    centres = (np.arange(p.layers) + 0.5) * p.layer_depth         # X0
    depth = (profile * centres).sum(1) / profile.sum(1)
    slope, _ = np.polyfit(np.log(energy), depth, 1)
    # GFlash: T = ln(E / E_c) + const, one X0 deeper per e-fold of energy
    assert 0.7 < slope < 1.3
    assert depth[energy > 30].mean() - depth[energy < 3].mean() > 2.0


def test_calo_refuses_energies_outside_the_fit():
    with pytest.raises(ConfigError, match="e_min"):
        calo.generate(calo.Params(e_min=0.01), seed=0, chunk_index=0, start=0, n=2)


# --------------------------------------------------------------------------- lorenz96
def _on_attractor() -> np.ndarray:
    return lorenz96.generate(lorenz96.Params(), seed=0, chunk_index=0, start=0, n=1)["inputs"][0, -1] \
        .astype(np.float64)


def test_lorenz96_rk4_step_matches_fine_euler():
    x0, dt, f = _on_attractor(), 0.01, 8.0
    rk4 = lorenz96.rk4_step(x0, dt, f)
    h = 1e-6
    x = x0.copy()
    for _ in range(round(dt / h)):
        x = x + h * lorenz96.tendency(x, f)
    assert np.abs(rk4 - x0).max() > 1e-2        # the step really moves the state
    # Euler's own error is O(h) ~ 2e-6 here; RK4's local error O(dt^5) ~ 5e-7
    np.testing.assert_allclose(rk4, x, atol=1e-5, rtol=0)


def test_lorenz96_is_bounded_and_chaotic():
    x = _on_attractor()
    y = x.copy()
    y[0] += 1e-8
    biggest = 0.0
    for _ in range(20):                          # 20 time units, ~34 e-folds at lambda ~ 1.7
        x = lorenz96.integrate(x, 100, 0.01, 8.0)
        y = lorenz96.integrate(y, 100, 0.01, 8.0)
        biggest = max(biggest, np.abs(x).max(), np.abs(y).max())
    assert biggest < 30
    assert np.abs(x - y).max() > 1e-2


def test_lorenz96_targets_continue_the_inputs():
    p = lorenz96.Params()
    out = lorenz96.generate(p, seed=0, chunk_index=0, start=0, n=4)
    last = out["inputs"][:, -1].astype(np.float64)
    first_target = lorenz96.integrate(last, p.frame_every, p.dt, p.forcing)
    last_target = lorenz96.integrate(last, p.frame_every * p.window_out, p.dt, p.forcing)
    # float32 storage rounds the start by ~1e-6, which chaos grows ~4x over the 0.8-unit window
    np.testing.assert_allclose(first_target, out["targets"][:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(last_target, out["targets"][:, -1], atol=1e-3, rtol=0)
    # burned in: the F = 8 climatology has mean ~2.35 and std ~3.6 per variable
    assert abs(out["inputs"].mean() - 2.35) < 0.4 and abs(out["inputs"].std() - 3.6) < 0.4


def test_lorenz96_trajectory_targets_are_the_next_frames():
    p = lorenz96.Params(mode="trajectory", trajectory_length=50)
    out = lorenz96.generate(p, seed=0, chunk_index=0, start=0, n=3)
    assert np.array_equal(out["targets"][:, :-1], out["inputs"][:, 1:])
    nxt = lorenz96.integrate(out["inputs"][:, -1].astype(np.float64), p.frame_every, p.dt,
                             p.forcing)
    np.testing.assert_allclose(nxt, out["targets"][:, -1], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- digits
def test_digits_are_sklearns_images_in_the_seeded_order():
    from sklearn.datasets import load_digits
    ref = load_digits()
    p = digits.Params()
    out = digits.generate(p, seed=5, chunk_index=2, start=512, n=256)
    idx = digits.order(5)[2 * 256: 3 * 256]
    assert np.array_equal(out["image"][:, 0], (ref.images[idx] / 16).astype(np.float32))
    assert np.array_equal(out["label"], ref.target[idx])
    assert set(out["label"]) == set(range(10))
    assert out["image"].min() == 0 and out["image"].max() == 1


def test_digits_chunks_cover_every_image_once_then_repeat():
    p = digits.Params()
    sizes = [256] * 7 + [1797 - 7 * 256]                          # the last chunk is short
    chunks = [digits.generate(p, 0, k, 256 * k, n) for k, n in enumerate(sizes)]
    labels = np.concatenate([c["label"] for c in chunks])
    images = np.concatenate([c["image"] for c in chunks])[:, 0]
    ref_images, ref_labels = digits.load()
    assert np.array_equal(np.bincount(labels), np.bincount(ref_labels))
    as_rows = lambda x: sorted(map(bytes, x.reshape(len(x), -1)))  # noqa: E731
    assert as_rows(images) == as_rows(ref_images)                  # same multiset of images
    wrapped = digits.generate(p, 0, 7, 1792, 256)                  # positions 1792..2047
    assert np.array_equal(wrapped["image"][5:], chunks[0]["image"][:251])


def test_digits_positions_do_not_depend_on_the_chunk_size():
    """The start offset, not chunk_index * chunk_size, places a chunk: any chunking agrees."""
    p = digits.Params()
    by_100 = np.concatenate([digits.generate(p, 2, k, 100 * k, 100)["label"] for k in range(5)])
    by_256 = np.concatenate([digits.generate(p, 2, k, 256 * k, 256)["label"] for k in range(2)])
    assert np.array_equal(by_100, by_256[:500])
    assert np.array_equal(digits.generate(p, 2, 9, 300, 40)["label"], by_100[300:340])


def test_digits_upscaling():
    import torch
    native = digits.generate(digits.Params(), 1, 0, 0, 16)["image"]
    nearest = digits.generate(digits.Params(size=16), 1, 0, 0, 16)["image"]
    assert np.array_equal(nearest, np.kron(native, np.ones((1, 1, 2, 2), np.float32)))
    bilinear = digits.generate(digits.Params(size=32, interpolation="bilinear"), 1, 0, 0, 16)["image"]
    ref = torch.nn.functional.interpolate(torch.from_numpy(native).double(), size=32,
                                          mode="bilinear", align_corners=False).float().numpy()
    np.testing.assert_allclose(bilinear, ref, atol=1e-6)
    assert bilinear.min() >= 0 and bilinear.max() <= 1
