"""Small helpers shared by the experiments: the classification runs (dataset, data, training
loop, evaluation), statistics, verdicts, plotting, markdown."""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from steadystep.experiments._deps import require
from steadystep.experiments._files import atomic_write
from steadystep.experiments.datasets import SIZES, ClassificationData, load_classification
from steadystep.experiments.estimate import model_flops
from steadystep.experiments.models import build_classifier
from steadystep.experiments.runner import RunContext, Settings
from steadystep.telemetry import read_csv

__all__ = [
    "RECOVERED_MARGIN",
    "RECOVERED_RULE",
    "VERDICTS",
    "band_plot",
    "boxcar",
    "claim",
    "classification_config",
    "classification_data",
    "classifier_flops",
    "evaluate_classifier",
    "figure_markdown",
    "finish_panel",
    "finite_or_none",
    "fmt",
    "mark_overlaps",
    "markdown_table",
    "mean_std",
    "minibatch_steps",
    "overlaps",
    "plt",
    "read_log",
    "save",
    "text_table",
]


def plt() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed); a
    :class:`~steadystep.experiments._deps.MissingDependencyError` naming the ``exp`` extra when
    matplotlib is not installed."""
    require("matplotlib", "the figures").use("Agg", force=True)
    return require("matplotlib.pyplot", "the figures")


def classification_config(
    experiment: str, settings: Settings, scale: dict[str, Any], paper_dataset: str
) -> dict[str, Any]:
    """The configuration every run of the classification experiment ``experiment`` shares at
    ``settings``, the keys :func:`classification_data` and :func:`classifier_flops` read: the
    dataset (the one asked for, else ``paper_dataset`` at the paper's scale and ``mnist1d``
    below it; ValueError for ``crops``, the images of the supersampling task), then the number
    of training examples, epochs and evaluations per epoch of ``scale`` (the experiment's row of
    :mod:`steadystep.experiments.scales` at ``settings.scale``)."""
    dataset = settings.dataset or (paper_dataset if settings.scale == "paper" else "mnist1d")
    if dataset == "crops":
        raise ValueError(f"the {experiment} experiment needs a classification dataset, not 'crops'")
    return dict(
        dataset=dataset,
        n_train=scale["n_train"],
        epochs=scale["epochs"],
        evals_per_epoch=scale["evals"],
    )


def classification_data(
    experiment: str, cfg: dict[str, Any], ctx: RunContext, *, standardize: str | None = None
) -> ClassificationData:
    """The dataset of a run of ``experiment`` (``cfg["dataset"]``; with ``cfg["n_train"]`` its
    first ``n_train`` training and ``max(n_train // 4, 100)`` test examples), standardised
    per ``standardize`` if given; loaded once per run directory (``ctx.cached``)."""

    def make() -> ClassificationData:
        data = load_classification(cfg["dataset"], ctx.settings.data_dir)
        if cfg["n_train"]:
            data = data.subset(cfg["n_train"], max(cfg["n_train"] // 4, 100))
        return data if standardize is None else data.standardized(standardize)

    return ctx.cached(f"{experiment}:{cfg['dataset']}:{cfg['n_train']}", make)


def classifier_flops(
    experiment: str, cfg: dict[str, Any], batch: Callable[[int], int], *, eval_train: bool
) -> float:
    """Rough FLOPs of a run of ``experiment`` on ``cfg["dataset"]`` (its sizes cut as
    :func:`classification_data` cuts them; :mod:`steadystep.experiments.estimate`): the
    training steps at batch size ``batch(n)`` for ``n`` training examples, and the
    evaluations of the test set (and of the training set with ``eval_train``)."""
    n, n_test, shape = SIZES[cfg["dataset"]]
    if cfg["n_train"]:
        n, n_test = min(n, cfg["n_train"]), min(n_test, max(cfg["n_train"] // 4, 100))
    bs = batch(n)

    def make() -> torch.nn.Module:
        return build_classifier(cfg["model"], shape, 10)

    key = (experiment, cfg["model"])
    train = cfg["epochs"] * (n // bs) * model_flops(key, make, shape, bs, True)
    evals = (cfg["epochs"] * cfg["evals_per_epoch"] + 1) * (n_test + (n if eval_train else 0))
    return float(train + evals * model_flops(key, make, shape, 1, False))


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """A run's CSV log (:meth:`RunContext.log <steadystep.experiments.runner.RunContext.log>`,
    read by :func:`steadystep.telemetry.read_csv`) as float64 arrays, one per column."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in read_csv(path).items()}


def finite_or_none(x: Any) -> Any:
    """Floats that are NaN/inf become None so results.json stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; 0 for a single value) over finite values, and their count."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, 0
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def boxcar(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing boxcar average (the papers smooth their learning curves this way); NaN-aware."""
    window = max(1, min(int(window), len(x)))
    if window == 1 or len(x) == 0:
        return np.asarray(x, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    cn = np.concatenate([[0.0], np.cumsum(ok)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    n = cn[idx] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (cs[idx] - cs[lo]) / np.maximum(n, 1), np.nan)


# The words a report uses for a claim, and what each means. Every experiment decides its verdict
# by a rule written next to its claim (and printed in the report); these are the shared meanings.
VERDICTS = {
    "reproduced": "the measured effect has the paper's direction, beyond the seed-to-seed noise "
    "the rule states, on enough of the evidence the rule asks for",
    "not reproduced": "enough evidence, and the effect is absent or reversed",
    "inconclusive": "too little evidence to say either (too few cells or seeds, or an effect "
    "inside the seed noise, or evidence split both ways)",
}
# A run that went bad and came back: what "recovered" means in a report (SALeRA's rescued runs).
RECOVERED_MARGIN = 0.05
RECOVERED_RULE = (
    "recovered: a final test error within 5 percentage points of the median final test error "
    "of the healthy runs of the same model (the runs of the grid that did not fail)"
)


def claim(paper: str, measured: str, verdict: str) -> dict[str, str]:
    """A paper claim next to what this run measured; verdict is one of :data:`VERDICTS`."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {sorted(VERDICTS)}, got {verdict!r}")
    return {"paper": paper, "measured": measured, "verdict": verdict}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[Any]], width: int = 100) -> str:
    """A plain aligned table for the terminal, at most ``width`` columns wide when the other
    columns leave the last one 20 or more: the last column's cells wrap onto more lines."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    room = width - sum(widths[:-1]) - 2 * (len(widths) - 1)
    if widths[-1] > room >= 20:
        widths[-1] = room
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    for r in rows:
        lines = textwrap.wrap(r[-1], widths[-1]) or [""]
        out.append(fmt.format(*r[:-1], lines[0]).rstrip())
        out += [fmt.format(*("" for _ in r[:-1]), more).rstrip() for more in lines[1:]]
    return "\n".join(out)


def band_plot(
    ax: Any, x: np.ndarray, curves: Sequence[np.ndarray], label: str, color: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds with a +-1 std band (NaN-aware; all curves on the same x); returns the
    plotted (x, mean), for :func:`mark_overlaps`."""
    n = min(len(c) for c in curves)
    y = np.stack([np.asarray(c[:n], dtype=np.float64) for c in curves])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of diverged runs
        mean = np.nanmean(y, axis=0)
        std = np.nanstd(y, axis=0) if len(curves) > 1 else np.zeros(n)
    ax.plot(x[:n], mean, label=label, color=color, lw=1.2)
    if len(curves) > 1:
        ax.fill_between(x[:n], mean - std, mean + std, color=color, alpha=0.2, lw=0)
    return np.asarray(x[:n]), mean


OVERLAP_RTOL = 0.01


def overlaps(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, str]]:
    """Pairs ``(hidden, top)`` of curves drawn in this order whose means coincide: within
    :data:`OVERLAP_RTOL` (relative) at every point both have, so the first is hidden under the
    second at a figure's resolution."""
    out = []
    labels = list(curves)
    for i, low in enumerate(labels):
        for top in labels[i + 1 :]:
            (xa, a), (xb, b) = curves[low], curves[top]
            n = min(len(a), len(b))
            if n == 0 or not np.array_equal(xa[:n], xb[:n]):
                continue
            a, b = a[:n], b[:n]
            both = np.isfinite(a) & np.isfinite(b)
            if not both.any() or (np.isfinite(a) != np.isfinite(b)).any():
                continue
            scale = np.maximum(np.abs(a[both]), np.abs(b[both]))
            if np.all(np.abs(a[both] - b[both]) <= OVERLAP_RTOL * scale):
                out.append((low, top))
                break
    return out


def mark_overlaps(ax: Any, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Make a curve hidden under a later one visible: it is drawn again on top, dashed with
    markers, and a note on the panel says which curves coincide; returns the notes (for the
    figure's caption)."""
    notes = []
    for k, (low, top) in enumerate(overlaps(curves)):
        x, y = curves[low]
        line = next(ln for ln in ax.get_lines() if ln.get_label() == low)
        ax.plot(
            x,
            y,
            color=line.get_color(),
            ls="--",
            marker="o",
            ms=3,
            markevery=max(1, len(x) // 8),
            lw=1.0,
        )
        note = f"{low} is under {top} (the curves coincide; dashed)"
        ax.text(0.02, 0.03 + 0.07 * k, note, transform=ax.transAxes, fontsize=6.5, va="bottom")
        notes.append(note)
    return notes


def finish_panel(
    ax: Any,
    drawn: dict[str, tuple[np.ndarray, np.ndarray]],
    note: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    legend: dict[str, Any],
    log: bool = False,
) -> list[str]:
    """Label a panel of curves the reports' way (title, axis labels and ticks in their font
    sizes, a log y axis with ``log``, the legend with ``legend``'s keywords when a curve was
    drawn) after :func:`mark_overlaps` on ``drawn``; returns its notes, each after ``note``."""
    notes = [f"{note}: {n}" for n in mark_overlaps(ax, drawn)]
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if drawn:  # a partial run may have no curve in a panel yet
        ax.legend(**legend)
    ax.tick_params(labelsize=7)
    return notes


def figure_markdown(
    summary: dict[str, Any],
    figs: list[str],
    run_dir: Path,
    *,
    alt: str | None = None,
    captions: dict[str, str] | None = None,
) -> list[str]:
    """The lines of ``report.md`` that show the figures ``figs`` (files under ``run_dir``):
    each image (``alt`` its text, else the file's stem), then the notes on its overlapping
    curves (``summary["figure_notes"]`` under the stem, from :func:`finish_panel` or
    :func:`mark_overlaps`) and its caption in ``captions`` (by stem), if any."""
    lines: list[str] = []
    for fpath in figs:
        stem, link = Path(fpath).stem, Path(fpath).relative_to(run_dir).as_posix()
        lines += [f"![{stem if alt is None else alt}]({link})", ""]
        notes = summary.get("figure_notes", {}).get(stem)
        if notes:
            lines += ["*Overlapping curves: " + "; ".join(notes) + ".*", ""]
        if captions and stem in captions:
            lines += [captions[stem], ""]
    return lines


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}"


def save(fig: Any, path: Path) -> str:
    """Write ``fig`` to ``path`` atomically (Note [atomic files] in ``experiments._files``)."""
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(
        path, lambda f: fig.savefig(f, format=fmt, dpi=110, bbox_inches="tight"), binary=True
    )
    plt().close(fig)
    return str(path)


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` on ``(x, y)``, in eval mode, by chunks."""
    model.eval()
    losses, errors = [], []
    for i in range(0, len(y), chunk):
        logits = model(x[i : i + chunk])
        losses.append(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
        errors.append((logits.argmax(1) != y[i : i + chunk]).sum())
    model.train()
    n = len(y)
    return float(torch.stack(losses).sum()) / n, float(torch.stack(errors).sum()) / n


def minibatch_steps(
    model: torch.nn.Module,
    opt: Any,
    data: ClassificationData,
    ctx: RunContext,
    batch: int,
    epochs: int,
    generator: torch.Generator,
    *,
    pass_loss: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Train ``model`` with ``opt`` on the cross-entropy of ``data``'s training set (on
    ``ctx.device``): ``epochs`` epochs of ``n // batch`` mini-batches (the last partial one left
    out), each epoch in a new order drawn from ``generator``; ``opt.step(loss=...)`` with
    ``pass_loss`` (steadystep's optimizers), else ``opt.step()``. Yields ``(step, loss)`` after
    each step (steps count from 1); the progress of ``ctx`` advances every 25 steps and by the
    rest at the end."""
    x, y = data.x_train, data.y_train
    n = len(y)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(ctx.device)
        for b in range(n // batch):
            idx = perm[b * batch : (b + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if pass_loss:
                opt.step(loss=loss.detach())
            else:
                opt.step()
            step += 1
            yield step, loss
            if step % 25 == 0:
                ctx.advance(25)
    ctx.advance(step % 25)
