r"""Device-side telemetry: record every component's ``stats()`` each step, read them rarely.

:class:`Monitor` calls ``stats()`` on each component (an :class:`~steadystep.ALRC`, a steadystep
optimizer, a guard, anything with a ``stats()`` that returns 0-d tensors) at every
:meth:`Monitor.step`, stacks the values into one small tensor *on the device* and keeps it. Every
``every`` steps it moves all kept rows to the host in one transfer (the only host sync), writes them
to a CSV file and, when installed, TensorBoard, and logs notable events with :mod:`logging` at
WARNING.

CSV format (what ``steadystep report`` reads)
    A header line, then one line per recorded step, comma separated, no index column::

        step,loss,alrc/threshold,alrc/sigma,...,salera/rollbacks,...

    * ``step`` (first column): the integer step number (the Monitor's own counter, starting at 0,
      or the ``step=`` passed to :meth:`Monitor.step`).
    * Then the extra scalars passed as keywords to :meth:`Monitor.step` (e.g. ``loss``), in the
      order first given.
    * Then ``<component>/<stat>`` for each component in the order given to the Monitor and each
      key of its ``stats()`` in dict order (Note [one naming]). ``<component>`` is the name
      given as ``(name, obj)``, else the class name in lower case, with ``_1``, ``_2``, ...
      appended on repeats; a :class:`~steadystep.Stabilized` adds none, its keys
      (``alrc/threshold``, ``guard/rollbacks``...) name their component already. A stat that
      is a tensor with several elements becomes ``<component>/<stat>/<i>`` (flattened order).
    * Values: integers (``int``/``bool`` stats) as ``42``; floats as Python's ``repr`` (``0.125``,
      ``1e-08``, ``nan``, ``inf``, ``-inf``). Readable by ``csv``, ``numpy.genfromtxt(...,
      delimiter=",", names=True)`` and ``pandas.read_csv``.
    * The file is created (overwritten) at the first flush and appended to afterwards; the
      columns never change within a file.
    * A resumed run continues the same file: :meth:`Monitor.state_dict` records how much of it
      belongs to the checkpoint, and :meth:`Monitor.load_state_dict` cuts off the rows that the
      interrupted run wrote after it, so the file ends up as an uninterrupted run's would.

Note [one naming]
    A statistic has one name wherever it is read: ``<component>/<stat>``, with ``/<i>``
    appended per element of a multi-element stat. For ``ss.stabilize``'s optimizer these are
    its ``stats()`` keys as they are (``alrc/threshold``, ``guard/rollbacks``, ``cprop/...``);
    for any other object the component is the name given to the Monitor, else its class name
    in lower case (``alrc/threshold`` for an :class:`~steadystep.ALRC`, ``salera/rollbacks``).
    The Monitor's CSV and TensorBoard use these names; the framework integrations send them to
    their loggers under one prefix, ``steadystep/`` (Lightning's :class:`StatsLogger
    <steadystep.integrations.lightning.StatsLogger>` and the Hugging Face
    :class:`SteadystepTrainer <steadystep.integrations.transformers.SteadystepTrainer>`), so a
    logger's ``steadystep/guard/rollbacks`` is ``opt.stats()["guard/rollbacks"]``.
    :func:`component_name` and :func:`metric_name` are the two rules.

Events logged at WARNING (logger ``"steadystep"``), each once, with its step number:
    * a rollback: a ``rollbacks`` (or ``alarms``) counter of a component increased;
    * an LR cut: an ``lr_cuts`` counter increased, or else any stat named ``lr``/``lr_*``/``*_lr``
      or ``*lr_multiplier*`` fell by more than ``lr_cut_ratio`` (default: to below 0.75 of its
      previous value) in one step;
    * sustained clipping: a ``clipped_fraction`` stayed above 0.5 for ``clip_patience`` (100)
      consecutive steps; logged once per such stretch;
    * a non-finite (``nan``/``inf``) value appearing in a stat that was finite.

Examples:
    >>> import torch, steadystep as ss
    >>> alrc = ss.ALRC()
    >>> monitor = ss.Monitor(alrc, every=10)
    >>> for step in range(20):
    ...     loss = alrc(torch.rand(8) + 1.0).mean()
    ...     monitor.step(loss=loss.detach())
    >>> monitor.columns[:3]
    ['step', 'loss', 'alrc/threshold']
    >>> len(monitor.history)
    20
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from steadystep._validation import check_positive

__all__ = ["Monitor", "component_name", "metric_name", "read_csv"]

logger = logging.getLogger("steadystep")

Row = dict[str, float]


def component_name(obj: Any) -> str:
    """The name put before ``obj``'s ``stats()`` keys (Note [one naming]): ``""`` for an
    object whose keys name their component already (a :class:`~steadystep.Stabilized`, with
    its class attribute ``stats_component = ""``), else the class name in lower case."""
    name = getattr(type(obj), "stats_component", None)
    return type(obj).__name__.lower() if name is None else name


def metric_name(component: str, key: str) -> str:
    """``<component>/<key>``, or ``key`` alone for an unnamed component (Note [one naming])."""
    return f"{component}/{key}" if component else key


def _kind(value: Any) -> str:
    """``"int"`` for integer/bool values (written exactly), ``"float"`` otherwise."""
    if isinstance(value, Tensor):
        return "float" if value.is_floating_point() else "int"
    if isinstance(value, (bool, int)):
        return "int"
    return "float"


def _stat_name(column: str) -> str:
    """``"salera/lr_multiplier/1"`` -> ``"lr_multiplier"``."""
    parts = column.split("/")
    if len(parts) >= 3 and parts[-1].isdigit():
        return parts[-2]
    return parts[-1]


def _component_of(column: str) -> str:
    """``"opt/guard/rollbacks"`` -> ``"opt/guard"``; ``"salera/lr/1"`` -> ``"salera"``."""
    parts = column.split("/")
    if len(parts) >= 3 and parts[-1].isdigit():
        parts = parts[:-1]
    return "/".join(parts[:-1]) or parts[0]


def _is_lr_key(column: str) -> bool:
    stat = _stat_name(column)
    return stat == "lr" or stat.startswith("lr_") or stat.endswith("_lr") or "lr_multiplier" in stat


class Monitor:
    r"""Record the ``stats()`` of steadystep components every step; flush every ``every`` steps.

    Call :meth:`step` once per training step (after ``optimizer.step()``). It costs a few small
    device ops (``stats()`` and one ``torch.stack``) and never reads a value on the host; every
    ``every`` steps the rows kept since the last flush are copied to the host at once (one
    synchronisation), appended to ``csv_path`` and TensorBoard, passed to ``log_fn`` and scanned
    for events (see the module docstring for the CSV format and the events).

    Args:
        *components: objects with a ``stats()`` method returning a dict of tensors (0-d or small),
            or ``(name, obj)`` pairs to choose the column prefix.
        every: flush interval in steps (default 50).
        csv_path: file to write rows to (default None: no CSV).
        tensorboard_dir: directory for a ``torch.utils.tensorboard.SummaryWriter`` (default None;
            ignored with a warning when TensorBoard is not installed).
        log_fn: called as ``log_fn(metrics, step)`` for every flushed row (``metrics`` without
            ``step``), e.g. a Lightning logger's ``log_metrics``.
        keep_history: keep flushed rows in :attr:`history` (default True).
        clip_patience: consecutive steps of ``clipped_fraction > 0.5`` before warning (100).
        lr_cut_ratio: an LR stat falling below this fraction of its previous value in one step
            is an LR cut (default 0.75).
        events: log the events listed in the module docstring (default True);
            False for a plain log whose gaps and cuts are expected (e.g. a test error that is
            NaN between evaluations).

    :meth:`close` (or leaving a ``with`` block) flushes what is left and closes the files.
    :meth:`state_dict` / :meth:`load_state_dict` carry a Monitor across a checkpoint: a fresh
    Monitor with the same components and ``csv_path`` continues the CSV of the interrupted run
    without a duplicate or missing row.

    Examples:
        >>> import torch, steadystep as ss
        >>> alrc = ss.ALRC()
        >>> with ss.Monitor(("clip", alrc), every=5) as monitor:
        ...     for _ in range(7):
        ...         _ = alrc(torch.rand(4) + 1.0)
        ...         monitor.step()
        >>> [row["step"] for row in monitor.history][-1], "clip/mu1" in monitor.columns
        (6, True)
    """

    def __init__(
        self,
        *components: Any,
        every: int = 50,
        csv_path: str | os.PathLike[str] | None = None,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        log_fn: Callable[[Row, int], None] | None = None,
        keep_history: bool = True,
        clip_patience: int = 100,
        lr_cut_ratio: float = 0.75,
        events: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got every={every!r}")
        if (
            isinstance(clip_patience, bool)
            or not isinstance(clip_patience, int)
            or clip_patience < 1
        ):
            raise ValueError(
                f"clip_patience must be an integer >= 1, got clip_patience={clip_patience!r}"
            )
        check_positive("lr_cut_ratio", lr_cut_ratio)
        if not lr_cut_ratio < 1.0:
            raise ValueError(f"lr_cut_ratio must be in (0, 1), got lr_cut_ratio={lr_cut_ratio}")
        self.components: list[tuple[str, Any]] = []
        seen: dict[str, int] = {}
        for item in components:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, obj = item
            else:
                name, obj = component_name(item), item
            if not callable(getattr(obj, "stats", None)):
                raise TypeError(
                    f"Monitor components need a stats() method; {type(obj).__name__} has none"
                )
            if name in seen:
                seen[name] += 1
                name = f"{name or type(obj).__name__.lower()}_{seen[name]}"
            else:
                seen[name] = 0
            self.components.append((name, obj))
        self.every = every
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.tensorboard_dir = None if tensorboard_dir is None else os.fspath(tensorboard_dir)
        self.log_fn = log_fn
        self.keep_history = keep_history
        self.clip_patience = clip_patience
        self.lr_cut_ratio = float(lr_cut_ratio)
        self.events = bool(events)
        self.history: list[Row] = []
        self.columns: list[str] = []
        self._kinds: list[str] = []
        self._layout: list[tuple[str, int]] | None = None  # (key, numel) in column order
        self._pending: list[Tensor] = []
        self._pending_steps: list[int] = []
        self._count = 0
        self._csv_started = False
        self._last: Row | None = None  # last flushed row, to detect changes across flushes
        self._clip_streak: dict[str, int] = {}
        self._clip_warned: dict[str, bool] = {}
        self._writer: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                logger.warning("tensorboard is not installed; Monitor writes no TensorBoard logs")
            else:
                self._writer = SummaryWriter(os.fspath(tensorboard_dir))

    # -- recording --------------------------------------------------------------------------

    def _gather(self, extra: Mapping[str, Any]) -> tuple[list[tuple[str, int]], list[Tensor]]:
        layout: list[tuple[str, int]] = []
        values: list[Tensor] = []
        kinds: list[str] = []
        for key, value in extra.items():
            t = (
                value.detach()
                if isinstance(value, Tensor)
                else torch.tensor(value, dtype=torch.float64)
            )
            layout.append((key, t.numel()))
            values.append(t.reshape(-1))
            kinds.append(_kind(value))
        for name, obj in self.components:
            for key, value in obj.stats().items():
                t = (
                    value.detach()
                    if isinstance(value, Tensor)
                    else torch.tensor(value, dtype=torch.float64)
                )
                layout.append((metric_name(name, key), t.numel()))
                values.append(t.reshape(-1))
                kinds.append(_kind(value))
        if self._layout is None:
            self._kinds = ["int"]
            self.columns = ["step"]
            for (key, numel), kind in zip(layout, kinds, strict=True):
                names = [key] if numel == 1 else [f"{key}/{i}" for i in range(numel)]
                self.columns.extend(names)
                self._kinds.extend([kind] * len(names))
        return layout, values

    @torch.no_grad()
    def step(self, step: int | None = None, **scalars: Tensor | float) -> None:
        """Record one row: ``scalars`` (e.g. ``loss=loss.detach()``) and every component's stats.

        ``step`` defaults to the Monitor's own counter (0, 1, 2, ...). No host read happens here
        except at a flush, every ``every`` calls.
        """
        layout, values = self._gather(scalars)
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise RuntimeError(
                "the stats of the monitored components changed shape or keys between steps "
                f"(columns were {self.columns[1:]}); create a new Monitor for the new layout"
            )
        device = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
        # float64 keeps integer counters exact up to 2**53; MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        row = torch.cat([v.to(device=device, dtype=dtype, non_blocking=True) for v in values])
        self._pending.append(row)
        self._pending_steps.append(self._count if step is None else int(step))
        self._count += 1
        if len(self._pending) >= self.every:
            self.flush()

    # -- flushing ---------------------------------------------------------------------------

    def flush(self) -> list[Row]:
        """Copy the kept rows to the host (one sync), write them, scan for events; return them."""
        if not self._pending:
            return []
        host = torch.stack(self._pending).cpu().tolist()  # the one host synchronisation
        steps = self._pending_steps
        self._pending, self._pending_steps = [], []
        rows: list[Row] = []
        for s, values in zip(steps, host, strict=True):
            row: Row = {"step": s}
            for col, kind, v in zip(self.columns[1:], self._kinds[1:], values, strict=True):
                row[col] = int(v) if kind == "int" and math.isfinite(v) else v
            rows.append(row)
        for row in rows:
            if self.events:
                self._scan(row)
            self._last = row
        self._write_csv(rows)
        if self._writer is not None:
            for row in rows:
                for col in self.columns[1:]:
                    self._writer.add_scalar(col, row[col], global_step=row["step"])
            self._writer.flush()
        if self.log_fn is not None:
            for row in rows:
                self.log_fn({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
        if self.keep_history:
            self.history.extend(rows)
        return rows

    def _write_csv(self, rows: list[Row]) -> None:
        if self.csv_path is None:
            return
        mode = "a" if self._csv_started else "w"
        with open(self.csv_path, mode, newline="") as f:
            w = csv.writer(f)
            if not self._csv_started:
                w.writerow(self.columns)
                self._csv_started = True
            for row in rows:
                w.writerow(
                    [repr(row[c]) if isinstance(row[c], float) else row[c] for c in self.columns]
                )

    # -- events -----------------------------------------------------------------------------

    def _scan(self, row: Row) -> None:
        last = self._last
        step = row["step"]
        has_cut_counter = {_component_of(c) for c in self.columns if _stat_name(c) == "lr_cuts"}
        for col in self.columns[1:]:
            stat = _stat_name(col)
            new = row[col]
            old = None if last is None else last[col]
            if stat == "clipped_fraction":
                self._scan_clipping(col, new, step)
            if old is None:
                continue
            if isinstance(old, float) and math.isfinite(old) and not math.isfinite(new):
                logger.warning("steadystep: step %d: %s became %r", step, col, new)
            if stat in ("rollbacks", "alarms", "lr_cuts") and new > old:
                component = _component_of(col)
                rolled = f"{component}/rollbacks"
                if (
                    stat == "alarms"
                    and rolled in row
                    and last is not None
                    and row[rolled] > last[rolled]
                ):
                    continue  # reported as a rollback
                what = {"rollbacks": "rolled back", "alarms": "raised an alarm"}.get(
                    stat, "cut the learning rate"
                )
                logger.warning(
                    "steadystep: step %d: %s %s (%s = %d)", step, component, what, stat, new
                )
            elif (
                _is_lr_key(col)
                and _component_of(col) not in has_cut_counter
                # a guard's applied rate falls with its lr_scale: one report, of the scale
                and not (stat == "lr" and f"{_component_of(col)}/lr_scale" in row)
                and old > 0
                and new < self.lr_cut_ratio * old
            ):
                logger.warning(
                    "steadystep: step %d: learning rate cut: %s fell from %.6g to %.6g",
                    step,
                    col,
                    old,
                    new,
                )

    def _scan_clipping(self, col: str, value: float, step: int) -> None:
        if value > 0.5:
            self._clip_streak[col] = self._clip_streak.get(col, 0) + 1
        else:
            self._clip_streak[col] = 0
            self._clip_warned[col] = False
        if self._clip_streak[col] >= self.clip_patience and not self._clip_warned.get(col, False):
            self._clip_warned[col] = True
            logger.warning(
                "steadystep: step %d: %s has clipped over half of each batch for %d steps; "
                "the loss may have shifted for good (consider a larger n_sigma or beta1 nearer 1)",
                step,
                _component_of(col),
                self._clip_streak[col],
            )

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this Monitor; **flushes** the kept rows first.

        The flush (one host read, the CSV written, events logged) makes the checkpoint and the
        CSV agree: the state records the step counter, the columns, the CSV's size in bytes at
        this moment (``csv_bytes``) and what the event scan remembers (the last row, the
        clipping streaks). :attr:`history` is not included: it holds the rows flushed by this
        process (the CSV holds them all). Plain Python values, loadable with
        ``torch.load(weights_only=True)``.
        """
        self.flush()
        csv_bytes = 0
        if self.csv_path is not None and self._csv_started:
            csv_bytes = os.path.getsize(self.csv_path)
        return {
            "format": 1,
            "count": self._count,
            "columns": list(self.columns),
            "kinds": list(self._kinds),
            "layout": None if self._layout is None else [list(x) for x in self._layout],
            "csv_started": self._csv_started,
            "csv_bytes": csv_bytes,
            "last": None if self._last is None else dict(self._last),
            "clip_streak": dict(self._clip_streak),
            "clip_warned": dict(self._clip_warned),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the run a :meth:`state_dict` was taken from; call it before the first step.

        The CSV at this Monitor's ``csv_path`` (the interrupted run's file) is cut back to the
        size it had at the checkpoint, dropping the rows the interrupted run wrote after it,
        which the resumed run writes again; later flushes append. A file shorter than that, or
        with another header, raises a ValueError (it is not the checkpoint's file). TensorBoard
        events from after the checkpoint are purged when the writer restarts.
        """
        if self._count or self._pending or self._layout is not None:
            raise ValueError(
                "load_state_dict needs a fresh Monitor (this one has recorded steps already); "
                "create the Monitor, load the state, then step"
            )
        missing = {"count", "columns", "kinds", "layout", "csv_started", "csv_bytes"} - set(
            state_dict
        )
        if missing:
            raise ValueError(
                f"state_dict is not a Monitor's: it lacks {sorted(missing)} (found "
                f"{sorted(state_dict)})"
            )
        layout = state_dict["layout"]
        started = bool(state_dict["csv_started"])
        if self.csv_path is not None and started:
            self._cut_csv(int(state_dict["csv_bytes"]), list(state_dict["columns"]))
        self._count = int(state_dict["count"])
        self.columns = list(state_dict["columns"])
        self._kinds = list(state_dict["kinds"])
        self._layout = None if layout is None else [(str(k), int(n)) for k, n in layout]
        self._csv_started = started and self.csv_path is not None
        last = state_dict.get("last")
        self._last = None if last is None else dict(last)
        self._clip_streak = dict(state_dict.get("clip_streak", {}))
        self._clip_warned = dict(state_dict.get("clip_warned", {}))
        if self._writer is not None and self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer.close()
            purge = 0 if self._last is None else int(self._last["step"]) + 1
            self._writer = SummaryWriter(self.tensorboard_dir, purge_step=purge)

    def _cut_csv(self, size: int, columns: list[str]) -> None:
        """Cut the CSV back to ``size`` bytes, after checking it is the checkpoint's file."""
        path = self.csv_path
        assert path is not None
        found = os.path.getsize(path) if os.path.isfile(path) else None
        if found is None or found < size:
            raise ValueError(
                f"the checkpoint's Monitor had written {size} bytes to {path}, but the file "
                + ("is missing" if found is None else f"has {found}")
                + ": it is not the file of the interrupted run (give that csv_path)"
            )
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise ValueError(
                f"{path} has the columns {header[:4]}..., the checkpoint's Monitor wrote "
                f"{columns[:4]}...: it is not the file of the interrupted run"
            )
        if found > size:
            os.truncate(path, size)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Flush what is left and close TensorBoard."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.components)
        return f"Monitor({names}, every={self.every}, csv_path={self.csv_path!r})"


def read_csv(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """Read a Monitor CSV into ``{column: values}`` (floats; ``nan``/``inf`` kept).

    Examples:
        >>> import tempfile, os, torch, steadystep as ss
        >>> path = os.path.join(tempfile.mkdtemp(), "m.csv")
        >>> alrc = ss.ALRC()
        >>> with ss.Monitor(alrc, every=4, csv_path=path) as m:
        ...     for _ in range(6):
        ...         _ = alrc(torch.rand(4) + 1.0)
        ...         m.step()
        >>> from steadystep.telemetry import read_csv
        >>> read_csv(path)["step"]
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        cols: dict[str, list[float]] = {h: [] for h in header}
        for line in reader:
            for h, v in zip(header, line, strict=True):
                cols[h].append(float(v))
    return cols
