"""Matplotlib figures of runs and evaluations, as PNG bytes or RGB arrays (for W&B and the report).

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot: no global
state, no display, safe in any thread of rank 0.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import physics

Rows = list[dict[str, float]]
REAL, GENERATED = "#1f77b4", "#d62728"


def new_figure(n_panels: int, width: float = 3.2, height: float = 2.6, ncol: int = 3) -> tuple[Figure, list]:
    """A figure with n_panels axes laid out ncol per row (extra axes hidden)."""
    ncol = max(1, min(ncol, n_panels))
    nrow = -(-n_panels // ncol)
    fig = Figure(figsize=(width * ncol, height * nrow), dpi=100, layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel()))
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png")
    return buf.getvalue()


def to_array(fig: Figure) -> np.ndarray:
    """The figure as a uint8 (H, W, 3) RGB image."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------- physics
def observable_histograms(real: physics.Arrays, generated: physics.Arrays,
                          distances: dict[str, float]) -> Figure:
    """One histogram per observable, real and generated on shared bins, W1 in the title."""
    fig, axes = new_figure(len(real))
    for ax, name in zip(axes, real):
        both = np.concatenate([real[name], generated[name]])
        bins = np.histogram_bin_edges(both, bins=30)
        ax.hist(real[name], bins=bins, density=True, alpha=0.55, color=REAL, label="real")
        ax.hist(generated[name], bins=bins, density=True, histtype="step", lw=1.8,
                color=GENERATED, label="generated")
        ax.set_title(f"{name}   W1 = {distances.get(f'w1/{name}', float('nan')):.4g}", fontsize=9)
        ax.set_xlabel(name)
    axes[0].legend(fontsize=8)
    return fig


def profile_figure(real: physics.Arrays, generated: physics.Arrays) -> Figure:
    """Mean per-sample profiles (spectra, shower profiles), real vs generated; spectra on log y."""
    fig, axes = new_figure(len(real))
    for ax, name in zip(axes, real):
        for arr, color, label in ((real[name], REAL, "real"), (generated[name], GENERATED, "generated")):
            mean, std = arr.mean(0), arr.std(0)
            x = np.arange(len(mean))
            ax.plot(x, mean, color=color, label=label)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
        if "spectrum" in name:
            ax.set_yscale("log")
            ax.set_xlabel("wavenumber k")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    return fig


def comparison_figures(cmp: physics.Comparison) -> dict[str, Figure]:
    """Histograms of the scalar observables with their W1, and the mean profiles when the source
    declares any: the figures of `physics.compare`, for training and evaluation alike."""
    out = {"observables": observable_histograms(cmp.real_scalars, cmp.generated_scalars,
                                                 cmp.distances)}
    r_prof, g_prof = cmp.profiles()
    if r_prof:
        out["profiles"] = profile_figure(r_prof, g_prof)
    return out


def physics_figures(obs: physics.Observables | None, real_batch: dict[str, np.ndarray],
                    generated: np.ndarray,
                    affine: tuple[np.ndarray, np.ndarray] | None = None,
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The training run's physics figures: `comparison_figures` of real vs generated samples as
    RGB uint8 images, and the W1 distance of each observable ("w1/<name>"); ({}, {}) when `obs`
    (the source's declared observables) is None.

    real_batch["x"] and `generated` are (N, ...) in the loader's normalised space when `affine`
    (pipeline.data.store.normalization of the store's train statistics) is given, else in physical
    units. Two-level variables (Ising spins) are drawn from their probabilities, as evaluate does
    (physics.physical: the one spin-conversion rule).
    """
    if obs is None:
        return {}, {}
    real, gen = (physics.physical(obs, a, affine) for a in (real_batch["x"], generated))
    cmp = physics.compare(obs, real, gen)
    return {k: to_array(f) for k, f in comparison_figures(cmp).items()}, cmp.distances


# --------------------------------------------------------------------------- runs
def loss_curves(runs: dict[str, Rows], keys: Sequence[str] | None = None, max_panels: int = 9) -> Figure:
    """One panel per metric key (default: every train/ and val/ scalar), one line per run."""
    if keys is None:
        seen: dict[str, None] = {}
        for rows in runs.values():
            for row in rows:
                seen.update({k: None for k, v in row.items() if k.startswith(("train/", "val/"))
                             and isinstance(v, (int, float))})
        # train before val, losses first within each
        keys = sorted(seen, key=lambda k: (not k.startswith("train/"), not k.endswith("/loss"), k))
        keys = keys[:max_panels]
    fig, axes = new_figure(max(1, len(keys)))
    for ax, key in zip(axes, keys):
        for name, rows in runs.items():
            pts = [(r["_step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="." if len(pts) < 30 else None, label=name)
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if len(runs) > 1 and ys and min(ys) > 0 and max(ys) > 20 * min(ys):
            ax.set_yscale("log")  # runs of different families differ by orders of magnitude
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    if len(runs) > 1 and keys:
        axes[0].legend(fontsize=7)
    return fig


STEP_PARTS = ("data", "forward", "backward", "allreduce", "optimizer", "logging", "other")


def step_time_shares(rows: Rows) -> Figure | None:
    """train.profile=steps (issue 28): each rank's share of step time in each part, averaged over
    the run's log lines, as one stacked bar per rank; None when the run was not profiled."""
    ranks: dict[str, list[list[float]]] = {}
    for row in rows:
        for key in row:
            if key.startswith("profile/rank") and key.endswith("/forward"):
                rank = key.split("/")[1]
                ranks.setdefault(rank, []).append([row.get(f"profile/{rank}/{p}", 0.0)
                                                   for p in STEP_PARTS])
    if not ranks:
        return None
    fig, axes = new_figure(1)
    ax, bottom = axes[0], np.zeros(len(ranks))
    means = np.array([np.mean(v, axis=0) for v in ranks.values()])  # (ranks, parts)
    for i, part in enumerate(STEP_PARTS):
        ax.bar(list(ranks), means[:, i], bottom=bottom, label=part)
        bottom += means[:, i]
    ax.set_ylabel("share of step time")
    ax.set_title("where step time went (train.profile)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class."""
    return np.bincount(np.ravel(y_true) * n_classes + np.ravel(y_pred),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                     names: Sequence[str] | None = None) -> Figure:
    """Counts of (true, predicted) classes, each axis ticked with the class names (the store's
    class table) or the label values 0..K-1."""
    counts = confusion_counts(y_true, y_pred, n_classes)
    size = max(3.2, 0.45 * n_classes + 1.6)  # room for the names
    fig, (ax,) = new_figure(1, size + 0.4, size)
    ax.imshow(counts, cmap="Blues")
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                color="white" if c > counts.max() / 2 else "black")
    names = [str(n) for n in (names if names is not None else range(n_classes))]
    ax.set_xticks(range(n_classes), names, rotation=45 if max(map(len, names)) > 3 else 0,
                  ha="right" if max(map(len, names)) > 3 else "center", fontsize=7)
    ax.set_yticks(range(n_classes), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {np.trace(counts) / max(counts.sum(), 1):.3f}", fontsize=9)
    return fig


def field_panels(prediction: np.ndarray, truth: np.ndarray, n: int = 4) -> Figure:
    """Rows of prediction / truth / |error| for the first n fields (N, [C,] H, W), channel 0."""
    pred, true = (np.asarray(a)[:n] for a in (prediction, truth))
    pred, true = (a[:, 0] if a.ndim == 4 else a for a in (pred, true))
    fig = Figure(figsize=(7.5, 2.3 * len(pred)), dpi=100, layout="constrained")
    axes = fig.subplots(len(pred), 3, squeeze=False)
    lo, hi = min(pred.min(), true.min()), max(pred.max(), true.max())
    for row, p, t in zip(axes, pred, true):
        for ax, img, title, kw in ((row[0], p, "prediction", dict(vmin=lo, vmax=hi)),
                                   (row[1], t, "truth", dict(vmin=lo, vmax=hi)),
                                   (row[2], np.abs(p - t), "|error|", dict(cmap="magma"))):
            fig.colorbar(ax.imshow(img, **kw), ax=ax, shrink=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    return fig


def forecast_figure(prediction: np.ndarray, truth: np.ndarray, sites: int = 3) -> Figure:
    """Forecast vs truth over time (T, D) for the first `sites` variables of one sample."""
    pred, true = np.asarray(prediction), np.asarray(truth)
    pred, true = (a.reshape(len(a), -1) for a in (pred, true))
    fig, axes = new_figure(min(sites, pred.shape[1]), 3.4, 2.4)
    for i, ax in enumerate(axes):
        ax.plot(true[:, i], color=REAL, label="truth")
        ax.plot(pred[:, i], "--", color=GENERATED, label="forecast")
        ax.set_title(f"variable {i}", fontsize=9)
        ax.set_xlabel("frame")
    axes[0].legend(fontsize=8)
    return fig


def predicted_vs_true(prediction: np.ndarray, truth: np.ndarray, name: str, r2: float,
                      max_points: int = 5000) -> Figure:
    """Each predicted value against its true value, in the target's units, with the diagonal a
    perfect model lies on (a field's values pooled; at most `max_points`, evenly spaced)."""
    p, t = np.ravel(prediction), np.ravel(truth)
    keep = np.linspace(0, len(t) - 1, min(len(t), max_points)).astype(int)
    fig, (ax,) = new_figure(1, 3.6, 3.4)
    ax.scatter(t[keep], p[keep], s=4, alpha=0.5, color=REAL, linewidths=0)
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="predicted = true")
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    ax.set_title(f"{len(t)} values, R\u00b2 {r2:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def score_histograms(inliers: np.ndarray, outliers: np.ndarray, auc: float) -> Figure:
    """Anomaly scores of held-out (in-distribution) and out-of-distribution samples."""
    fig, (ax,) = new_figure(1, 4.5, 3.0)
    bins = np.histogram_bin_edges(np.concatenate([inliers, outliers]), bins=30)
    ax.hist(inliers, bins=bins, alpha=0.6, color=REAL, label="held-out (in distribution)")
    ax.hist(outliers, bins=bins, alpha=0.6, color=GENERATED, label="out of distribution")
    ax.set_xlabel("reconstruction error")
    ax.set_title(f"ROC AUC {auc:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- latent spaces
def _image(sample: np.ndarray) -> np.ndarray:
    """One sample as a 2-D array: channel 0 of (C, H, W), (H, W) as is, a vector as one row."""
    return sample[0] if sample.ndim == 3 else (sample if sample.ndim == 2 else sample.reshape(1, -1))


def image_rows(rows: dict[str, np.ndarray], columns: Sequence[str], title: str) -> Figure:
    """One row of decoded samples (N, ...) per entry, N = len(columns), on one grey scale."""
    n = len(columns)
    lo = min(float(r.min()) for r in rows.values())
    hi = max(float(r.max()) for r in rows.values())
    fig = Figure(figsize=(1.3 * n + 0.6, 1.4 * len(rows) + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (label, samples) in enumerate(rows.items()):
        for j, ax in enumerate(axes[i]):
            ax.imshow(_image(samples[j]), cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-12),
                      interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == len(rows) - 1:
                ax.set_xlabel(columns[j], fontsize=8)
        axes[i][0].set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return fig


def along_paths(t: np.ndarray, paths: dict[str, dict[str, np.ndarray]]) -> Figure:
    """Each observable against the path fraction t, one line per path kind (slerp, linear)."""
    names = list(next(iter(paths.values())))
    fig, axes = new_figure(len(names))
    for ax, name in zip(axes, names):
        for kind, values in paths.items():
            ax.plot(t, values[name], marker="o", ms=3, label=kind)
        ax.set_xlabel("path fraction")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    return fig
