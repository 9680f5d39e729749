"""Plots for the calibrate and evaluate stages: each function writes one PNG and returns its path.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so importing this module
changes no global matplotlib state and needs no display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from angular.eval.calibration import confidence_calibration_error, reliability_bins
from angular.eval.checks import (
    as_array,
    as_bool_array,
    as_float_array,
    as_int_array,
    check_same_length,
)

__all__ = [
    "reliability_diagram",
    "roc_plot",
    "confusion_plot",
    "embedding_plot",
    "training_curves",
]

DPI = 110
UNKNOWN_NAME = "unknown"


def _new_figure(width: float = 5.5, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def reliability_diagram(
    confidence, correct, path: str | os.PathLike, title: str, n_bins: int = 15
) -> Path:
    """Accuracy against mean confidence per equal-width confidence bin (bars), with the diagonal of
    perfect calibration, the gap shaded, the ECE in the legend, and sample counts per bin below."""
    bins = reliability_bins(confidence, correct, n_bins)
    ece = confidence_calibration_error(confidence, correct, n_bins)
    figure = _new_figure(5.0, 5.5)
    top, bottom = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=True
    )
    width = bins["bin_upper"] - bins["bin_lower"]
    filled = bins["count"] > 0
    top.bar(
        bins["bin_lower"][filled],
        bins["accuracy"][filled],
        width=width[filled],
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    top.bar(
        bins["bin_lower"][filled],
        bins["confidence"][filled] - bins["accuracy"][filled],
        bottom=bins["accuracy"][filled],
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left", title=f"ECE = {ece:.4f}", fontsize="small")
    bottom.bar(bins["bin_lower"], bins["count"], width=width, align="edge", color="tab:gray")
    bottom.set(xlabel="confidence", ylabel="samples", xlim=(0, 1))
    return _save(figure, path)


def roc_plot(
    curves: Mapping[str, tuple],
    path: str | os.PathLike,
    title: str,
    *,
    log_x: bool = False,
    xlabel: str = "false positive rate",
    ylabel: str = "true positive rate",
) -> Path:
    """ROC curves, one line per ``name -> (fpr, tpr)``; ``log_x`` for verification (TAR at low FAR)."""
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict of name -> (fpr, tpr)")
    figure = _new_figure()
    axes = figure.subplots()
    for name, curve in curves.items():
        if len(curve) < 2:
            raise ValueError(f"curves[{name!r}] must be (fpr, tpr)")
        fpr = as_float_array(curve[0], f"curves[{name!r}] fpr", ndim=1)
        tpr = as_float_array(curve[1], f"curves[{name!r}] tpr", ndim=1)
        check_same_length(**{f"curves[{name!r}] fpr": fpr, f"curves[{name!r}] tpr": tpr})
        if log_x:
            positive = fpr > 0  # log axis: the (0, 0) point cannot be drawn
            fpr, tpr = fpr[positive], tpr[positive]
        axes.plot(fpr, tpr, label=str(name), linewidth=1.5, drawstyle="default")
    if log_x:
        axes.set_xscale("log")
    else:
        axes.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
        axes.set_xlim(0, 1)
    axes.set(ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def confusion_plot(
    labels, predicted, class_names: Sequence[str], path: str | os.PathLike, title: str
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), row-normalised colours, counts
    written in the cells when there are at most 25 classes. Negative values in ``labels`` or
    ``predicted`` (an unknown identity, a rejected prediction) form an extra ``unknown`` class."""
    labels = as_int_array(labels, "labels")
    predicted = as_int_array(predicted, "predicted")
    check_same_length(labels=labels, predicted=predicted)
    names = [str(name) for name in class_names]
    k = len(names)
    if k == 0:
        raise ValueError("class_names must name at least one class")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if values.max() >= k:
            raise ValueError(f"{name} must lie below len(class_names) = {k}, got {values.max()}")
    if (labels < 0).any() or (predicted < 0).any():
        names.append(UNKNOWN_NAME)
        labels = np.where(labels < 0, k, labels)
        predicted = np.where(predicted < 0, k, predicted)
    size = len(names)
    matrix = np.zeros((size, size), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    row_totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_totals, where=row_totals > 0, out=np.zeros(matrix.shape))

    side = min(4.0 + 0.35 * size, 16.0)
    figure = _new_figure(side + 1.0, side)
    axes = figure.subplots()
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(size)
    axes.set_xticks(ticks, names, rotation=90 if size > 10 else 0, fontsize="small")
    axes.set_yticks(ticks, names, fontsize="small")
    axes.set(xlabel="predicted", ylabel="true", title=title)
    if size <= 25:
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if normalised[row, column] > 0.5 else "black"
                axes.text(
                    column,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize="x-small" if size > 12 else "small",
                )
    return _save(figure, path)


def embedding_plot(
    embeddings,
    identities,
    known,
    path: str | os.PathLike,
    title: str,
    seed: int = 0,
    *,
    perplexity: float = 30.0,
    max_iter: int = 500,
    max_points: int = 1500,
) -> Path:
    """t-SNE (scikit-learn, cosine metric, PCA start, seeded) of embeddings in 2-D, coloured by
    identity; known identities as dots, unknown identities (never trained on) as crosses.

    t-SNE is the slow part (tens of seconds for a few hundred points on 2 busy cores), so it runs
    ``max_iter`` optimisation steps (scikit-learn's default is 1000; 500 settles small sets) on
    at most ``max_points`` samples, a seeded random subset when there are more.
    """
    from sklearn.manifold import TSNE  # imported here: it is slow to import and only needed here

    embeddings = as_float_array(embeddings, "embeddings", ndim=2)
    identities = as_array(identities, "identities", ndim=1)
    known = as_bool_array(known, "known")
    n = check_same_length(embeddings=embeddings, identities=identities, known=known)
    if n < 4:
        raise ValueError(f"embeddings needs at least 4 samples for a t-SNE plot, got {n}")
    if max_iter < 250:
        raise ValueError(f"max_iter must be at least 250 (scikit-learn's minimum), got {max_iter}")
    if n > max_points:
        subset = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        embeddings, identities, known = embeddings[subset], identities[subset], known[subset]
        n = max_points
    # t-SNE needs perplexity < n; keep the usual 30 when there are enough samples.
    perplexity = float(min(perplexity, (n - 1) / 3))
    # scikit-learn renamed n_iter to max_iter in 1.5.
    steps = "max_iter" if "max_iter" in TSNE().get_params() else "n_iter"
    points = TSNE(
        n_components=2,
        perplexity=perplexity,
        metric="cosine",
        init="pca",
        random_state=seed,
        **{steps: max_iter},
    ).fit_transform(embeddings)

    _, codes = np.unique(identities, return_inverse=True)
    codes = codes.ravel()
    # 40 distinct colours (enough for ORL's 40 people); more identities reuse them.
    colours = list(matplotlib.colormaps["tab20"].colors) + list(
        matplotlib.colormaps["tab20b"].colors
    )
    figure = _new_figure(6.5, 6.0)
    axes = figure.subplots()
    legend = []
    for is_known, marker, label in ((True, "o", "known"), (False, "x", "unknown")):
        selected = known == is_known
        if not selected.any():
            continue
        axes.scatter(
            points[selected, 0],
            points[selected, 1],
            c=[colours[code % len(colours)] for code in codes[selected]],
            marker=marker,
            s=18 if is_known else 30,
            linewidths=0.3 if is_known else 1.2,
        )
        # A grey legend entry: the colours stand for identities, the marker for known or not.
        legend.append(
            Line2D(
                [],
                [],
                marker=marker,
                color="dimgray",
                linestyle="",
                label=f"{label} identities ({len(np.unique(codes[selected]))})",
            )
        )
    axes.set(title=title, xticks=[], yticks=[])
    axes.legend(handles=legend, loc="best", fontsize="small")
    return _save(figure, path)


def training_curves(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str,
    *,
    xlabel: str = "epoch",
) -> Path:
    """One panel per metric (``name -> values per epoch``), e.g. loss and accuracy by epoch."""
    if not isinstance(history, Mapping) or not history:
        raise ValueError("history must be a non-empty dict of metric name -> values")
    series = {
        name: as_float_array(values, f"history[{name!r}]", ndim=1)
        for name, values in history.items()
    }
    for name, values in series.items():
        if len(values) == 0:
            raise ValueError(f"history[{name!r}] is empty")
    figure = _new_figure(4.0 * len(series), 3.5)
    panels = np.atleast_1d(figure.subplots(1, len(series), squeeze=False)[0])
    for axes, (name, values) in zip(panels, series.items()):
        axes.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3)
        axes.set(xlabel=xlabel, title=name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.grid(True, alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)
