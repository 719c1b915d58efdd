"""train.compile=true: torch.compile'd losses train, and checkpoints stay the raw module's."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.core.checkpoint import load
from pipeline.core.errors import UserError
from pipeline.runtime.dist import init_distributed
from pipeline.train.assembly import build, build_model
from pipeline.train.loop import fit, train_step
from pipeline.train.run import weights_digest

pytestmark = pytest.mark.slow  # inductor compiles the VAE's forward and backward: a minute or more


def _run(store, tmp_path, *extra: str):
    path, overrides = store
    cfg = load_config("demo", overrides[1:] + [f"output_dir={tmp_path}", f"data.path={path}",
                                               "train.dist.backend=none", "train.batch_size=32",
                                               "train.logger.mode=disabled", "train.compile=true",
                                               *extra])
    return cfg, build(cfg, init_distributed(cfg.train.dist))


def test_a_compiled_run_trains_and_its_checkpoint_loads_into_an_uncompiled_model(small_store,
                                                                                  tmp_path):
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    cfg, run = _run(small_store, tmp_path, "train.max_steps=4", "train.logger.log_every=1")
    summary = fit(run)
    assert counters["stats"]["unique_graphs"] > graphs       # dynamo did compile the losses
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 0
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/model/loss"] for r in rows if "train/model/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    state = load(tmp_path / "train" / "checkpoints" / "final.pt")["model"]
    assert not [k for k in state if "_orig_mod" in k]          # the raw module's own keys
    eager = build_model(cfg)
    eager.load_state_dict(state)                               # strict: every key fits
    assert weights_digest(eager) == weights_digest(run.model)
    batch = next(iter(run.loader))
    eager.eval(), run.model.eval()
    with torch.no_grad():  # the KL term has no sampling: compiled and eager compute the same
        want = eager.losses(batch, "model")["kl"]
        got = run.losses(batch, "model")["kl"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


MLP = ["model=mlp", "model.in_features=256", "model.out_features=2",
       "data.inputs={x: spins, y: phase}"]


def test_compile_without_a_working_compiler_is_one_line_naming_the_cause_and_fix(
        small_store, tmp_path, monkeypatch):
    """A real inductor failure: the C++ compiler it is told to use does not exist."""
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor, "fx_graph_cache", False)     # no cached kernel to fall back on
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    torch._dynamo.reset()
    store = (small_store[0], [o for o in small_store[1] if not o.startswith("model.")])
    _, run = _run(store, tmp_path, *MLP)
    with pytest.raises(UserError) as e:
        train_step(run, [next(iter(run.loader))])
    torch._dynamo.reset()
    assert str(e.value).startswith("train.compile=true: torch.compile could not compile "
                                   "MLP.losses here (InvalidCxxCompiler: No working C++ compiler "
                                   "found in torch._inductor.config.cpp.cxx")
    assert str(e.value).endswith("; set train.compile=false") and "\n" not in str(e.value)
