"""Every configs/experiment/*.yaml, end to end at a tiny size: compose, prepare with a real Dask
LocalCluster into tmp, train two steps in-process, and check the losses.

One LocalCluster serves every prepare (data.dask.cluster=address), and experiments whose data.path
agree share one tiny store, as their full-size runs share one prepared store.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.own_data import write_calo_tree
from benchmarks.quality import HEADLINES, write_ising_domains
from pipeline.config import CONFIG_DIR, load_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
STEPS = 2

# Small but real data per source: short Markov chains and few samples; full-size lattices and
# grids, so every experiment's model runs exactly as configured.
SHRINK = {
    "ising2d": ["data.params.burn_in=10", "data.params.decorrelation=1", "data.n_samples=256",
                "data.chunk_size=64", "data.shard_size=64"],
    "darcy2d": ["data.n_samples=128", "data.chunk_size=64", "data.shard_size=64"],
    "calo": ["data.n_samples=128", "data.chunk_size=64", "data.shard_size=64"],
    "lorenz96": ["data.params.burn_in=100", "data.n_samples=128", "data.chunk_size=64",
                 "data.shard_size=64"],
    "digits": ["data.n_samples=256", "data.chunk_size=128", "data.shard_size=128"],
    "npy": ["data.chunk_size=64", "data.shard_size=64"],
    "hdf5": ["data.chunk_size=64", "data.shard_size=64"],   # the CaloGAN-style tree, written small
}
TRAIN = [f"train.max_steps={STEPS}", "train.batch_size=16", "train.dist.backend=none",
         "train.dist.nproc=1", "train.logger.mode=disabled", "train.logger.log_every=1",
         "train.logger.images_every=0", "train.threads=1"]


def shrunk(name: str, tmp: Path, scheduler: str) -> list[str]:
    cfg = load_config(name)
    store = tmp / "data" / Path(cfg.data.path).name
    out = [f"output_dir={tmp / 'runs' / name}", f"data.path={store}", "data.dask.progress=false",
           "data.dask.cluster=address", f"data.dask.scheduler={scheduler}",
           *SHRINK[cfg.data.source], *TRAIN]
    if cfg.data.source == "npy":  # the CycleGAN's two Ising domains, written small
        out.append(f"data.params.path={tmp / 'domains'}")
    if cfg.data.source == "hdf5":  # a user's CaloGAN-style tree (benchmarks.own_data)
        out.append(f"data.params.path={tmp / 'calo' / '*' / '*.h5'}")
    if cfg.train.init_from:  # another experiment's full-size output (tests/pipeline/test_transfer)
        out.append("train.init_from=")
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A Dask LocalCluster for every prepare, a tmp folder, and the stores prepared so far."""
    from distributed import LocalCluster
    tmp = tmp_path_factory.mktemp("experiments")
    write_ising_domains(tmp / "domains", n=128, burn_in=5, decorrelation=1, chunk=64)
    write_calo_tree(tmp / "calo", files=1, per_file=50)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield {"tmp": tmp, "scheduler": cluster.scheduler_address, "stores": {}}


def prepared(lab, name: str):
    """The experiment's shrunk config, its store prepared once per data.path."""
    from pipeline.data.prepare import content_config, prepare
    cfg = load_config(name, shrunk(name, lab["tmp"], lab["scheduler"]))
    stores = lab["stores"]
    if cfg.data.path not in stores:
        prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
        stores[cfg.data.path] = content_config(cfg.data)
    # experiments sharing a store must agree on what is in it
    assert stores[cfg.data.path] == content_config(cfg.data), cfg.data.path
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_prepares_and_trains(lab, name):
    from pipeline.runtime.dist import init_distributed
    from pipeline.train.assembly import build
    from pipeline.train.loop import fit
    cfg = prepared(lab, name)
    run = build(cfg, init_distributed(cfg.train.dist))
    phases = [p.name for p in run.phases]
    summary = fit(run)
    assert summary["steps"] == STEPS and summary["nonfinite_steps"] == 0
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    logged = [r for r in rows if any(k.endswith("/loss") for k in r)]
    # each step once; a critic taking 6 batches per step ends an epoch of the shrunk calo store
    # (~100 showers, batches of 16) after one step, and that epoch's summary row repeats step 1
    assert sorted({r["step"] for r in logged}) == list(range(1, STEPS + 1))
    for row in logged:  # every network of the model stepped, with a finite loss
        for phase in phases:
            assert math.isfinite(row[f"train/{phase}/loss"]), (phase, row)
    assert Path(summary["checkpoint"]).is_file()
    if cfg.model.name == "cyclegan":  # the quality table's translation distances, on this run
        from benchmarks.quality import translation_metrics
        distances = translation_metrics(Path(summary["checkpoint"]))
        assert len(distances) == 8 and all(math.isfinite(v) and v >= 0 for v in distances.values())


def test_every_experiment_has_a_quality_row():
    """Every experiment has a row in the README's quality table but the two demos (demo: the
    tests' base VAE; demo_generator: `make demo`, dcgan_ising2d_cond's model for fewer steps) and
    the transfer and adversarial experiments, which are measured against each other by their own
    protocol (README, "Transfer learning and adversarial training"; finetune needs pretrain's
    checkpoint, which one budgeted row cannot give), and the CaloGAN-style tree's two, which run
    on a user's files (README, "Bring your own data")."""
    own_protocol = {"cnn_ising2d_pretrain", "cnn_ising2d_finetune", "cnn_ising2d_scratch",
                    "cnn_ising2d_adv", "calo_tree_pid", "calo_tree_energy"}
    assert sorted(HEADLINES) == sorted(set(EXPERIMENTS) - {"demo", "demo_generator"} - own_protocol)


def test_every_model_family_has_an_experiment():
    from models import MODELS
    used = {load_config(name).model.name for name in EXPERIMENTS}
    assert used == set(MODELS), set(MODELS) - used
    cells = {load_config(n).model.params.cell for n in EXPERIMENTS if load_config(n).model.name == "rnn"}
    assert cells >= {"lstm", "gru"}


def test_experiments_sharing_a_store_agree_on_its_data():
    from pipeline.data.prepare import content_config
    by_path: dict[str, tuple[str, dict]] = {}
    for name in EXPERIMENTS:
        cfg = load_config(name)
        first = by_path.setdefault(cfg.data.path, (name, content_config(cfg.data)))
        assert first[1] == content_config(cfg.data), (first[0], name, cfg.data.path)
    assert len(by_path) >= 8  # one store per dataset variant, not one per experiment


def test_cyclegan_domains_are_ordered_and_disordered_ising_samples(tmp_path):
    from pipeline.physics import ising_magnetization
    out = write_ising_domains(tmp_path, n=96, lattice=16, burn_in=50, decorrelation=2, chunk=64)
    low, high = np.load(out / "low.npy"), np.load(out / "high.npy")
    assert low.shape == high.shape == (96, 1, 16, 16) and low.dtype == np.int8
    assert set(np.unique(low)) <= {-1, 1}
    m_low, m_high = (np.abs(ising_magnetization(a)) for a in (low, high))
    assert m_low.mean() > 0.8 > 0.3 > m_high.mean()   # T < T_c ordered, T > T_c disordered
    assert not list(out.glob(".*tmp*"))                # written atomically
