"""Quality per bin of a continuous condition, for conditional generators (issue #15).

A conditional generator can match the pooled distribution of an observable while getting each
condition wrong (showers at 1 GeV too wide, at 100 GeV too narrow). Issue #15 judges the
calorimeter model per incident-energy bin, as the CaloChallenge does (Krause et al. 2024,
arXiv:2410.21611, sec. 4): in each bin the W1 distance of every scalar observable, real test
samples against samples generated at the same conditions, over the floor of the same distance
between the real test samples and real train samples of the bin. Beside it the response, the mean
of one observable over the condition (the calorimeter's E_visible / E_incident), real against
generated, the quantity a detector is calibrated by.

A source opts in by declaring CONDITION_BINS (pipeline/data/sources/__init__.py); evaluate never
names one. Bins are quantiles of the test split's condition, so each holds the same number of
samples and its floor is as well measured as the next."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import physics


@dataclass(frozen=True)
class ConditionBins:
    """What a source with a continuous condition asks evaluate to report per bin."""
    n_bins: int = 4                 # quantile bins of the test split's condition
    response: str = ""              # a scalar observable whose mean / condition is the response
    label: str = "condition"        # the condition's name and unit, for the figure's axis
    log: bool = False               # a log axis for the condition (log-uniform energies)


def edges(cond: np.ndarray, n_bins: int) -> np.ndarray:
    """n_bins + 1 edges at the quantiles of `cond`, the first its minimum and the last its maximum."""
    return np.quantile(np.asarray(cond, np.float64), np.linspace(0, 1, n_bins + 1))


def index(cond: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """The bin of each value: [e_k, e_k+1) for every bin but the last, which holds its maximum;
    values outside the edges go to the nearest end bin."""
    k = np.searchsorted(bin_edges, np.asarray(cond, np.float64), side="right") - 1
    return np.clip(k, 0, len(bin_edges) - 2)


def binned_w1(real: dict[str, np.ndarray], generated: dict[str, np.ndarray],
              reference: dict[str, np.ndarray], bins: tuple[np.ndarray, np.ndarray, np.ndarray],
              n_bins: int) -> dict[str, float]:
    """Per bin k and scalar name: "w1_bin/k/name" (real vs generated), "w1_reference_bin/k/name"
    (real vs reference, the floor) and "w1_ratio_bin/k/name" (their ratio, when the floor is > 0).
    `bins` holds the bin index of each real, generated and reference sample."""
    out: dict[str, float] = {}
    in_real, in_gen, in_ref = bins
    for k in range(n_bins):
        if not (np.any(in_real == k) and np.any(in_gen == k) and np.any(in_ref == k)):
            continue
        for name in real:
            w1 = physics.wasserstein1(real[name][in_real == k], generated[name][in_gen == k])
            floor = physics.wasserstein1(real[name][in_real == k], reference[name][in_ref == k])
            out[f"w1_bin/{k}/{name}"], out[f"w1_reference_bin/{k}/{name}"] = w1, floor
            if floor > 0:
                out[f"w1_ratio_bin/{k}/{name}"] = w1 / floor
    return out


def response(values: np.ndarray, cond: np.ndarray, in_bin: np.ndarray, n_bins: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard error) of values / cond in each bin; NaN for an empty bin."""
    ratio = np.asarray(values, np.float64) / np.asarray(cond, np.float64)
    mean, err = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    for k in range(n_bins):
        r = ratio[in_bin == k]
        if len(r):
            mean[k], err[k] = r.mean(), r.std() / np.sqrt(len(r))
    return mean, err


@dataclass(frozen=True)
class Binned:
    """Everything evaluate reports per bin: metrics for the JSON and W&B, arrays for the figure."""
    metrics: dict[str, float]
    edges: np.ndarray
    centres: np.ndarray                       # mean condition of the real samples in each bin
    response: dict[str, tuple[np.ndarray, np.ndarray]]  # "real" / "generated" -> (mean, error)


def evaluate_bins(spec: ConditionBins, real: dict[str, np.ndarray], real_cond: np.ndarray,
                  generated: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                  reference_cond: np.ndarray) -> Binned:
    """The per-bin metrics of one evaluation. `real` and `generated` are scalar observables of
    samples aligned with `real_cond` (generated at the real samples' conditions); `reference` is
    a second real sample (the train split) at `reference_cond`, for the floors."""
    bin_edges = edges(real_cond, spec.n_bins)
    in_real, in_ref = index(real_cond, bin_edges), index(reference_cond, bin_edges)
    metrics = binned_w1(real, generated, reference, (in_real, in_real, in_ref), spec.n_bins)
    metrics.update({f"bin/{k}/low": float(bin_edges[k]) for k in range(spec.n_bins)})
    metrics.update({f"bin/{k}/high": float(bin_edges[k + 1]) for k in range(spec.n_bins)})
    centres = np.array([real_cond[in_real == k].mean() for k in range(spec.n_bins)])
    resp = {}
    if spec.response:
        for side, values in (("real", real), ("generated", generated)):
            resp[side] = response(values[spec.response], real_cond, in_real, spec.n_bins)
        for k in range(spec.n_bins):
            metrics[f"response_bin/{k}/real"] = float(resp["real"][0][k])
            metrics[f"response_bin/{k}/generated"] = float(resp["generated"][0][k])
            metrics[f"response_bin/{k}/ratio"] = float(resp["generated"][0][k] / resp["real"][0][k])
    return Binned(metrics, bin_edges, centres, resp)


def summary(binned: Binned) -> str:
    """One note line: the worst per-bin ratio of each observable, and the response ratios."""
    worst: dict[str, float] = {}
    for key, v in binned.metrics.items():
        if key.startswith("w1_ratio_bin/"):
            name = key.split("/", 2)[2]
            worst[name] = max(worst.get(name, 0.0), v)
    said = ", ".join(f"{k} {v:.2f}x" for k, v in worst.items())
    line = f"W1 / floor, worst of {len(binned.centres)} condition bins: {said}"
    if binned.response:
        ratios = [binned.metrics[f"response_bin/{k}/ratio"] for k in range(len(binned.centres))]
        line += "; response generated / real per bin: " + ", ".join(f"{r:.3f}" for r in ratios)
    return line


def response_figure(spec: ConditionBins, binned: Binned):
    """Response (mean of spec.response / condition) against the condition, real and generated,
    with standard errors; the bin edges dotted."""
    from pipeline.figures import GENERATED, REAL, new_figure
    fig, (ax,) = new_figure(1, width=4.8, height=3.2)
    for side, colour, marker in (("real", REAL, "s-"), ("generated", GENERATED, "o--")):
        mean, err = binned.response[side]
        ax.errorbar(binned.centres, mean, yerr=err, fmt=marker, color=colour, ms=4, capsize=2,
                    label=side)
    for e in binned.edges:
        ax.axvline(e, ls=":", color="grey", lw=0.6)
    ax.set_xscale("log" if spec.log else "linear")
    ax.set_xlabel(spec.label)
    ax.set_ylabel(f"{spec.response} / condition")
    ax.set_title("response per condition bin", fontsize=9)
    ax.legend(fontsize=7)
    return fig
