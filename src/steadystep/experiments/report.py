"""Build ``report.md``, ``results.json``, ``timings.json`` and the figures from a run directory.

Everything is rebuilt from the files the runner wrote (``config.json`` and ``runs/``), so a
report can be regenerated after an interruption or on another machine.
``results.json`` holds every number of the report and nothing that depends on the clock, so the
same command with the same seeds writes the same file; wall-clock times go to ``timings.json``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from steadystep.experiments import get_experiment
from steadystep.experiments._common import (
    VERDICTS,
    finite_or_none,
    markdown_table,
    text_table,
)
from steadystep.experiments._files import read_json, write_text
from steadystep.experiments.runner import load_records

__all__ = ["TINY_NOTE", "build_report", "read_config"]

# A tiny run is a smoke test of the pipeline, and its verdicts would read like findings: its
# report says so first, printed and in report.md.
TINY_NOTE = (
    "Scale tiny is a smoke test of the pipeline (a few steps of small models, one seed unless "
    "--seeds): verdicts at scale tiny decide nothing. Run --scale demo or larger to test the "
    "papers' claims."
)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a steadystep run directory (no config.json) and holds no "
            "Monitor CSV; give the --out directory of a `steadystep demo` or `steadystep "
            "reproduce` run, or a directory of ss.Monitor(csv_path=...) files"
        )
    config = read_json(path)
    if not isinstance(config, dict):
        raise FileNotFoundError(
            f"{path} is torn (an interrupted write); run the same `steadystep demo` or "
            f"`steadystep reproduce` command with --out {run_dir} to rewrite it (finished runs "
            "are kept), then `steadystep report` again"
        )
    return config


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("steadystep")
    except Exception:
        return "unknown"


def build_report(run_dir: Path) -> tuple[dict[str, Any], str]:
    """Write the report files into ``run_dir``; return (results, terminal summary text)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    experiments: dict[str, Any] = {}
    sections: list[str] = []
    terminal: list[str] = []
    claims_rows: list[list[str]] = []
    timings: dict[str, float] = {}
    for name in config["experiments"]:
        module = get_experiment(name)
        planned = config.get("planned", {}).get(name, [])
        unavailable = config.get("unavailable", {}).get(name)
        records = load_records(run_dir, name)
        # Only the planned runs belong to this report (a directory may hold others).
        if planned:
            records = [r for r in records if r["run_id"] in set(planned)]
        for r in records:
            if "wall_s" in r:
                timings[f"{name}/{r['run_id']}"] = r["wall_s"]
        entry: dict[str, Any] = {
            "title": module.title,
            "runs_planned": len(planned),
            "runs_finished": len(records),
        }
        if unavailable:
            entry["status"] = "unavailable"
            entry["reason"] = unavailable
            sections.append(f"## {module.title}\n\n**Not run**: {unavailable}\n")
            terminal.append(f"{name}: unavailable ({unavailable})")
            experiments[name] = entry
            continue
        if not records:
            entry["status"] = "no finished runs"
            sections.append(f"## {module.title}\n\nNo run finished.\n")
            experiments[name] = entry
            continue
        entry["status"] = "complete" if len(records) >= len(planned) else "partial"
        summary = module.summarize(records, run_dir)
        figs = module.figures(summary, records, run_dir)
        entry["summary"] = summary
        entry["figures"] = [Path(f).relative_to(run_dir).as_posix() for f in figs]
        entry["runs"] = [
            {k: r[k] for k in ("run_id", "seed", "config", "summary")} for r in records
        ]
        experiments[name] = entry
        head = f"## {module.title}\n"
        if entry["status"] == "partial":
            head += (
                f"\n*Partial: {len(records)} of {len(planned)} runs finished "
                "(interrupted); numbers below use the finished runs only.*\n"
            )
        claim_lines = []
        # A partial experiment says so in the summary table itself, beside each verdict.
        partial = (
            f" (partial: {len(records)} of {len(planned)} runs)"
            if entry["status"] == "partial"
            else ""
        )
        for c in summary.get("claims", []):
            claims_rows.append([name, c["paper"], c["measured"], f"**{c['verdict']}**{partial}"])
            claim_lines.append(
                f"- Paper: {c['paper']}.\n  Measured: {c['measured']}.\n  "
                f"Verdict: **{c['verdict']}**."
            )
        if not claim_lines:
            claim_lines.append("- Too few runs finished to test the paper's claims.")
        sections.append(
            head + "\n" + "\n".join(claim_lines) + "\n\n" + module.markdown(summary, figs, run_dir)
        )
        terminal.append(module.terminal(summary))

    settings = config["settings"]
    results = finite_or_none(
        {
            "steadystep_version": _version(),
            "command": config["command"],
            "settings": {k: v for k, v in settings.items() if k != "data_dir"},
            "experiments": experiments,
        }
    )
    # Note [atomic files] in steadystep.experiments._files: each file is replaced whole.
    write_text(
        run_dir / "results.json",
        json.dumps(results, indent=1, sort_keys=True, allow_nan=False) + "\n",
    )
    timing = {"total_run_s": sum(timings.values()), "runs": dict(sorted(timings.items()))}
    write_text(run_dir / "timings.json", json.dumps(timing, indent=1) + "\n")

    md = [
        f"# steadystep {config['command']} report",
        "",
        f"Command: `{config.get('argv', 'steadystep ' + config['command'])}`  ",
        f"Scale `{settings['scale']}`, device `{settings['device']}`, "
        f"dataset `{settings.get('dataset') or 'per-experiment default'}`, "
        f"steadystep {results['steadystep_version']}. "
        f"Compute time of the runs: {sum(timings.values()):.0f} s.",
        "",
        *([f"**{TINY_NOTE}**", ""] if settings["scale"] == "tiny" else []),
        "Each paper's claim next to what this run measured. Small-scale runs test the direction "
        "of an effect, not the paper's absolute numbers; a verdict is only as strong as the "
        "number of seeds behind it.",
        "",
        "Verdicts: " + "; ".join(f"**{k}**: {v}" for k, v in VERDICTS.items()) + ".",
        "",
    ]
    if claims_rows:
        md += [
            markdown_table(["method", "paper's claim", "measured here", "verdict"], claims_rows),
            "",
        ]
    md += sections
    md += [
        "---",
        "Files: `results.json` (every number above), `runs/<experiment>/<run>.csv` (per-step "
        "logs), `figures/`, `timings.json` (wall-clock). Rebuild with "
        f"`steadystep report {run_dir}`.",
        "",
    ]
    write_text(run_dir / "report.md", "\n".join(md))

    text = [textwrap.fill(TINY_NOTE, 100)] if settings["scale"] == "tiny" else []
    if claims_rows:
        text.append(
            text_table(
                ["method", "verdict", "paper's claim"],
                [[r[0], r[3].replace("*", ""), r[1]] for r in claims_rows],
            )
        )
    text += [t for t in terminal if t]
    return results, "\n\n".join(text)
