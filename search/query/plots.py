"""Pictures of a study: quality against cost for every trial, each method's chosen run with the
95% interval of its score, and learning-rate heat maps.

Drawn with matplotlib (Agg, no display needed); the file type follows the suffix (png, svg, pdf).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.query.intervals import RESAMPLES, SEED, metric_intervals
from search.query.report import StudyReport, pareto_front
from search.store import METRIC_NAMES, TrialRecord
from trainers import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_study"]

_Point = tuple[TrialRecord, float, float]  # (trial, quality, cost), as pareto_front gives them

_COST_LABELS = {
    "train_flops": "training compute of the run (reused phases included)",
    "train_device_s": "training time of the run (reused phases included), device-seconds",
    "train_wall_s": "training wall time of the run (reused phases included), s",
}
_COST_SCALES = {"train_flops": (1e12, ", TFLOP"), "flops": (1e12, ", TFLOP")}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_SUFFIXES = (".png", ".svg", ".pdf")


def plot_study(
    report: StudyReport,
    out: Path,
    *,
    metric: str = "f1",
    cost: str = "train_flops",
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Path:
    """Write the picture to ``out``; one panel of quality against cost, plus one heat map for each
    stage that searched both learning rates together (a coupled grid).

    Each method's chosen run (its best in its own stage, as ``compare`` picks it) carries its 95%
    bootstrap interval over the validation questions as an error bar, where the run has
    per-question results (``resamples`` and ``seed`` as in :mod:`search.query.intervals`)."""
    if out.suffix.lower() not in _SUFFIXES:
        raise ConfigError(
            f"plot file '{out}' must end in {', '.join(_SUFFIXES)}; pick one, e.g. -o {out.with_suffix('.png')}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, front = pareto_front(report, metric=metric, cost=cost)
    if not points:
        raise ConfigError(
            f"study '{report.name}' has no completed trial with {metric} and {cost} to plot; "
            f"see `ragsweep trials {report.name}`"
        )
    grids = _coupled_grids(report)
    figure, axes = plt.subplots(
        1, 1 + len(grids), figsize=(9.5 + 4.5 * len(grids), 5), squeeze=False
    )
    _quality_cost(axes[0][0], points, front, metric, cost)
    _error_bars(axes[0][0], points, metric, cost, resamples=resamples, seed=seed)
    for axis, (stage, rows) in zip(axes[0][1:], grids.items(), strict=True):
        _heat_map(figure, axis, stage, rows, metric)
    figure.suptitle(f"ragsweep study '{report.name}': {len(points)} completed trials")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _quality_cost(
    axis: Axes, points: list[_Point], front: list[_Point], metric: str, cost: str
) -> None:
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row.method for row, _, _ in points))
    colours = plt.get_cmap("tab10")
    scale, unit = _COST_SCALES.get(cost, (1.0, ""))
    for index, method in enumerate(methods):
        mine = [(value, price / scale) for row, value, price in points if row.method == method]
        axis.scatter(
            [price for _, price in mine],
            [value for value, _ in mine],
            # Methods often cost the same (one phase of the same model): shrinking sizes and
            # distinct shapes keep every point visible where they overlap.
            s=150 - 14 * (index % 8),
            marker=_MARKERS[index % len(_MARKERS)],
            color=colours(index % 10),
            label=method,
            edgecolor="black",
            linewidth=0.5,
            zorder=3,
        )
    axis.step(
        [price / scale for _, _, price in front],
        [value for _, value, _ in front],
        where="post",
        color="black",
        linestyle="--",
        linewidth=1,
        zorder=2,
        label="front: no other run is both better and cheaper",
    )
    for row, value, price in front:
        axis.annotate(
            row.id, (price / scale, value), textcoords="offset points", xytext=(6, 6), fontsize=8
        )
    axis.set_xlabel(f"{_COST_LABELS.get(cost, cost)}{unit}")
    axis.set_ylabel(f"validation {metric.upper()}")
    axis.set_title(f"{metric.upper()} against cost, one point per trial")
    axis.grid(True, alpha=0.3)


def _error_bars(
    axis: Axes, points: list[_Point], metric: str, cost: str, *, resamples: int, seed: int
) -> None:
    """Each method's chosen run's 95% interval as a vertical bar, then the legend."""
    import matplotlib.pyplot as plt

    key = METRIC_NAMES[metric]
    colours = plt.get_cmap("tab10")
    scale, _ = _COST_SCALES.get(cost, (1.0, ""))
    methods = list(dict.fromkeys(row.method for row, _, _ in points))
    label = (
        f"95% interval of each method's chosen run\n(bootstrap over validation questions,\n"
        f"{resamples} resamples, seed {seed})"
    )
    for index, method in enumerate(methods):
        own = [point for point in points if point[0].method == method and point[0].stage == method]
        if not own:
            continue
        row, value, price = max(own, key=lambda point: point[1])  # the first of equals
        interval = metric_intervals(row.questions, resamples=resamples, seed=seed).get(key)
        if interval is None:
            continue
        # The bar spans the interval even where the stored score and the questions' mean
        # differ in the last digits.
        axis.errorbar(
            [price / scale],
            [value],
            yerr=[[max(0.0, value - interval.low)], [max(0.0, interval.high - value)]],
            fmt="none",
            ecolor=colours(index % 10),
            elinewidth=1.5,
            capsize=5,
            alpha=0.7,
            zorder=2.5,  # behind the points, which stay visible where methods overlap
            label=label,
        )
        label = "_nolegend_"  # one legend entry for every bar
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _coupled_grids(report: StudyReport) -> dict[str, list[TrialRecord]]:
    """Stages whose completed trials vary both learning rates (a joint Cartesian grid)."""
    grids = {}
    for stage in report.stages:
        rows = [
            r
            for r in report.trials
            if r.stage == stage
            and r.state == "COMPLETE"
            and r.lr_embedder is not None
            and r.lr_generator is not None
        ]
        if len({r.lr_embedder for r in rows}) > 1 and len({r.lr_generator for r in rows}) > 1:
            grids[stage] = rows
    return grids


def _heat_map(figure: Figure, axis: Axes, stage: str, rows: list[TrialRecord], metric: str) -> None:
    import numpy as np

    key = METRIC_NAMES[metric]
    embedder_rates = sorted({r.lr_embedder for r in rows if r.lr_embedder is not None})
    generator_rates = sorted({r.lr_generator for r in rows if r.lr_generator is not None})
    values = np.full((len(generator_rates), len(embedder_rates)), np.nan)
    for row in rows:
        lr_embedder, lr_generator = row.lr_embedder, row.lr_generator
        if key in row.metrics and lr_embedder is not None and lr_generator is not None:
            cell = generator_rates.index(lr_generator), embedder_rates.index(lr_embedder)
            values[cell] = row.metrics[key]
    image = axis.imshow(values, origin="lower", cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            axis.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    axis.set_xticks(range(len(embedder_rates)), [f"{r:.0e}" for r in embedder_rates])
    axis.set_yticks(range(len(generator_rates)), [f"{r:.0e}" for r in generator_rates])
    axis.set_xlabel("embedder learning rate")
    axis.set_ylabel("generator learning rate")
    axis.set_title(f"{stage}: validation {metric.upper()} over the joint grid")
    figure.colorbar(image, ax=axis, shrink=0.8)
