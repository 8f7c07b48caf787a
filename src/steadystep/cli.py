"""The ``steadystep`` command: a demo and the reproductions of the three papers.

::

    steadystep demo                      # one quick experiment per method, a one-page report
    steadystep reproduce alrc|salera|cprop [--scale quick|paper] [--data-dir DIR] ...
    steadystep report RUN_DIR            # rebuild report.md / results.json / figures
    steadystep report MONITOR_DIR        # plot the Monitor CSV files there, with a summary

Each run directory holds ``config.json``, per-run CSV logs and JSON summaries under ``runs/``,
``figures/*.png``, ``report.md``, ``results.json`` and ``timings.json``, each written atomically,
so a kill at any moment leaves a directory that the same command continues (Note [atomic files]
in :mod:`steadystep.experiments._files`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Only what the parser needs: --help, --version and a usage error are answered without torch
# or the experiments (seconds to import); each command imports what it runs (Note [lazy
# exports] in steadystep).
import steadystep
from steadystep.experiments import EXPERIMENTS, SUMMARIES, default_seeds
from steadystep.experiments._deps import (
    DATASET_MODULES,
    MissingDependencyError,
    missing,
)
from steadystep.experiments.scales import SCALE_HELP, SCALES

__all__ = ["main"]

_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130


def _seeds_help(default_scale: str) -> str:
    """The ``--seeds`` help, from the experiments' own defaults (their tables in
    :mod:`steadystep.experiments.scales`)."""
    per_scale = "; ".join(
        f"{scale}: " + ", ".join(f"{n} {default_seeds(n, scale)}" for n in EXPERIMENTS)
        for scale in SCALES
    )
    return (
        "number of seeds per configuration (seeds 0..N-1). Default: the scale's "
        f"(default scale {default_scale}), per experiment: {per_scale}."
    )


def _add_run_options(p: argparse.ArgumentParser, default_scale: str) -> None:
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run directory to write (default: runs/<name>-<timestamp>/). Giving the directory "
        "of an interrupted run continues it: finished runs are kept and not run again.",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train: 'auto' (default) uses CUDA when available, else the CPU.",
    )
    p.add_argument("--seeds", type=int, metavar="N", help=_seeds_help(default_scale))
    p.add_argument(
        "--scale",
        choices=SCALES,
        default=default_scale,
        help=f"how much to run (default: {default_scale}). "
        + "; ".join(f"'{k}': {v}" for k, v in SCALE_HELP.items())
        + ".",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with real datasets, never downloaded: MNIST / Fashion-MNIST IDX files "
        "(DIR/MNIST/raw/train-images-idx3-ubyte[.gz], DIR/FashionMNIST/raw/...) and CIFAR-10 "
        "python batches (DIR/cifar-10-batches-py/data_batch_1..5, test_batch).",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads for torch (default 1: the demo's small models train fastest on one "
        "thread, and it keeps a shared machine responsive; raise it for --scale paper on a CPU).",
    )
    p.add_argument(
        "--dataset",
        choices=("mnist1d", "digits", "crops", "mnist", "fashion-mnist", "cifar10"),
        help="dataset instead of the experiment's default. Embedded (no files needed): "
        "mnist1d, digits (classification), crops (natural-image crops, supersampling). Real "
        "(need --data-dir): mnist, fashion-mnist, cifar10. Defaults: alrc crops, salera and "
        "cprop mnist1d; at --scale paper the paper's own (cifar10, mnist, fashion-mnist).",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steadystep",
        description="Reproduce ALRC, SALeRA and CProp with steadystep: training runs, tables, "
        "figures and a report that puts each paper's claim next to what was measured.",
        epilog="Examples:\n  steadystep demo --out runs/demo\n"
        "  steadystep reproduce cprop --seeds 3\n"
        "  steadystep reproduce salera --scale paper --device cuda --data-dir ~/data\n"
        "  steadystep report runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"steadystep {steadystep.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="one quick experiment per method and a one-page report (a few minutes on a CPU)",
        description="Run one small experiment per method (ALRC, SALeRA, CProp) and write a "
        "one-page report with tables and figures.",
    )
    _add_run_options(demo, "demo")
    rep = sub.add_parser(
        "reproduce",
        help="reproduce one paper's experiment: "
        f"{', '.join(EXPERIMENTS[:-1])} or {EXPERIMENTS[-1]}",
        description="Reproduce one paper's experiment at the chosen scale.",
    )
    rep.add_argument(
        "experiment",
        choices=EXPERIMENTS,
        help=" ".join(f"{name}: {SUMMARIES[name]}" for name in EXPERIMENTS),
    )
    _add_run_options(rep, "quick")
    report = sub.add_parser(
        "report",
        help="rebuild report.md, results.json and figures of a run directory, or plot the "
        "Monitor CSV files of a directory",
        description="Rebuild report.md, results.json, timings.json and figures/ from the "
        "finished runs in RUN_DIR (e.g. after Ctrl-C). Given a directory without a run (no "
        "config.json) that holds Monitor CSV files (ss.Monitor(..., csv_path=...)), or one such "
        "file, plot each column against the step into figures/ and write report.md with a "
        "summary of every column and of the alarms, rollbacks and LR cuts.",
    )
    report.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a directory written by demo/reproduce, or a directory of Monitor CSV files (or one)",
    )
    return parser


def _error(msg: str) -> int:
    print(f"steadystep: error: {msg}", file=sys.stderr)
    return _EXIT_USAGE


def _warn(msg: str) -> None:
    print(f"steadystep: warning: {msg}", file=sys.stderr)


def _check_dependencies(datasets: dict[str, list[str]]) -> None:
    """One :class:`MissingDependencyError` naming every package of the ``exp`` extra that the
    planned runs need (figures, progress bars, the embedded datasets) and that is missing."""
    needed = {"matplotlib": "the figures", "tqdm": "the progress bars"}
    for experiment, names in datasets.items():
        for name in names:
            for module in DATASET_MODULES.get(name, ()):
                needed.setdefault(module, f"the embedded dataset {name} ({experiment})")
    absent = missing(needed)
    if absent:
        raise MissingDependencyError(absent, ", ".join(dict.fromkeys(needed[m] for m in absent)))


def _warn_unused_data_dir(data_dir: str | None, datasets: dict[str, list[str]]) -> None:
    """--data-dir is read only by the real datasets: say so when no planned run reads it."""
    from steadystep.experiments.datasets import EMBEDDED

    if data_dir is None:
        return
    unused = {e: names for e, names in datasets.items() if set(names) <= set(EMBEDDED)}
    if unused:
        which = ", ".join(f"{e} runs on {' and '.join(n)}" for e, n in unused.items())
        _warn(
            f"--data-dir {data_dir} is not read: {which}, embedded (no files); choose a real "
            "dataset with --dataset mnist, fashion-mnist or cifar10 to read it"
        )


def _warn_paper_on_cpu(plans: list[tuple[Any, list[Any]]], threads: int) -> None:
    """Before ``--scale paper`` starts on a CPU: how many runs and roughly how long."""
    from steadystep.experiments.estimate import CPU_FLOPS_PER_THREAD, describe_seconds

    flops = sum(module.flops(spec) for module, specs in plans for spec in specs)
    runs = sum(len(specs) for _, specs in plans)
    seconds = flops / (CPU_FLOPS_PER_THREAD * threads)
    _warn(
        f"--scale paper on a CPU: {runs} runs at the paper's sizes, about {flops:.1e} "
        f"floating-point operations, roughly {describe_seconds(seconds)} with {threads} "
        f"thread(s) (at ~{CPU_FLOPS_PER_THREAD / 1e9:.0f} GFLOP/s per thread; use a GPU: "
        "--device cuda). Starting anyway: Ctrl-C stops it, finished runs are kept and the same "
        "command continues."
    )


def _device(choice: str) -> Any:
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(choice)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from steadystep.experiments import get_experiment, missing_api
    from steadystep.experiments._files import read_json, remove_stale_temporaries, write_text
    from steadystep.experiments.datasets import DatasetNotFoundError
    from steadystep.experiments.report import build_report
    from steadystep.experiments.runner import RunContext, Settings, run_all

    names = list(EXPERIMENTS) if args.command == "demo" else [args.experiment]
    if args.seeds is not None and args.seeds < 1:
        return _error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        device = _device(args.device)
    except RuntimeError as e:
        return _error(str(e))
    label = "demo" if args.command == "demo" else args.experiment
    out = Path(args.out or f"runs/{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = Settings(
        scale=args.scale,
        seeds=args.seeds,
        device=device.type,
        data_dir=args.data_dir,
        dataset=args.dataset,
    )
    modules = {n: get_experiment(n) for n in names}
    unavailable: dict[str, str] = {}
    for n in names:
        lacking = missing_api(n)
        if lacking:
            reason = (
                f"this steadystep lacks {', '.join(lacking)}, which the {n} experiment needs "
                "(the method has not landed in this version)"
            )
            if args.command == "reproduce":
                return _error(f"cannot reproduce {n}: {reason}")
            unavailable[n] = reason
    ctx = RunContext(settings=settings, device=device)
    plans: list[tuple[Any, list[Any]]] = []
    try:
        for n in names:
            if n not in unavailable:
                plans.append((modules[n], modules[n].plan(settings)))
    except ValueError as e:
        return _error(str(e))
    datasets = {m.name: sorted({s.config["dataset"] for s in specs}) for m, specs in plans}
    _check_dependencies(datasets)
    _warn_unused_data_dir(args.data_dir, datasets)
    if settings.scale == "paper" and device.type == "cpu":
        _warn_paper_on_cpu(plans, args.threads)  # before the data loads: it may take a while
    try:
        for module, specs in plans:
            module.prepare(specs, ctx)  # loads data now, so a missing file fails early
    except DatasetNotFoundError as e:
        return _error(str(e))
    except ValueError as e:
        return _error(str(e))

    config = {
        "command": label,
        "argv": "steadystep " + " ".join(shlex.quote(a) for a in argv),
        "experiments": names,
        "settings": settings.to_json(),
        "planned": {m.name: [s.run_id for s in specs] for m, specs in plans},
        "unavailable": unavailable,
    }
    config_path = out / "config.json"
    # Note [atomic files] in steadystep.experiments._files: a torn config.json (a kill while
    # it was written by an older version, a damaged copy) is treated as missing and rewritten.
    old = read_json(config_path)
    if old is not None:
        keys = ("command", "experiments", "settings", "planned")
        if not isinstance(old, dict) or any(old.get(k) != config[k] for k in keys):
            argv_old = old.get("argv") if isinstance(old, dict) else None
            return _error(
                f"{out} holds a run with other settings ({argv_old}); "
                "choose another --out or the same options to continue it"
            )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    write_text(config_path, json.dumps(config, indent=1))
    for n, reason in unavailable.items():
        print(f"steadystep: {n} skipped: {reason}", file=sys.stderr)
    total = sum(len(s) for _, s in plans)
    print(
        f"steadystep {label}: {total} runs ({', '.join(f'{m.name} {len(s)}' for m, s in plans)}) "
        f"at scale {settings.scale} on {device}; writing {out}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    interrupted = False
    try:
        run_all(plans, out, ctx)
    except KeyboardInterrupt:
        interrupted = True
        print(
            "\nsteadystep: interrupted; finished runs are kept. Building the report from them "
            f"(continue with the same command and --out {out}).",
            file=sys.stderr,
        )
    _, text = build_report(out)
    print(text)
    print(
        f"\nreport: {out / 'report.md'}\nresults: {out / 'results.json'}\n"
        f"figures: {out / 'figures'}\nwall time: {time.perf_counter() - start:.0f} s"
    )
    return _EXIT_INTERRUPTED if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``steadystep`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return _main(args, argv)
    except MissingDependencyError as e:
        return _error(str(e))


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "report":
        target = Path(args.run_dir)
        if not target.exists():  # said before anything is imported
            print(
                f"steadystep report: error: argument RUN_DIR: {target} does not exist; expected "
                "the --out directory of a `steadystep demo` or `steadystep reproduce` run, a "
                "directory of Monitor CSV files (ss.Monitor(csv_path=...)), or one such file",
                file=sys.stderr,
            )
            return _EXIT_USAGE
        absent = missing(["matplotlib"])
        if absent:
            raise MissingDependencyError(absent, "the figures")
        from steadystep.experiments.monitor_report import build_monitor_report, monitor_csvs
        from steadystep.experiments.report import build_report

        if not (target / "config.json").is_file() and monitor_csvs(target):
            monitor_report, text = build_monitor_report(target)
            print(text)
            print(f"\nreport: {monitor_report}")
            return 0
        try:
            _, text = build_report(Path(args.run_dir))
        except FileNotFoundError as e:
            return _error(str(e))
        print(text)
        print(f"\nreport: {Path(args.run_dir) / 'report.md'}")
        return 0
    if args.threads < 1:
        return _error(f"--threads must be >= 1, got {args.threads}")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    # Adam's second moments of tiny (quartic-error) gradients reach float32 denormals, which
    # make CPU arithmetic ~100x slower; flushing them to zero changes no reported digit.
    flush = torch.set_flush_denormal(True)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)
        if flush:
            torch.set_flush_denormal(False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
