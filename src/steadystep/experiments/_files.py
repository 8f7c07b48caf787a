"""The files of a run directory: written atomically, read back with a torn file treated as
missing.

Note [atomic files]: every file the CLI writes (``config.json``, each run's JSON summary,
``results.json``, ``timings.json``, ``report.md``, the figures) is written to a temporary file in
the same directory, flushed to disk and renamed over the target with ``os.replace``, which is
atomic on POSIX and Windows: a kill at any moment leaves either the old file or the new one,
never a mix (only a leftover ``.<name>.*.tmp``, removed by the next run). A run's CSV log is
appended while it trains; it is complete before the run's JSON summary appears, and a run
without its summary is run again from scratch (its CSV rewritten), so a torn CSV never belongs
to a finished run. A file torn some other way (0 bytes, truncated: a full disk, a copy cut
short) is reported on stderr and treated as missing, so a rerun writes it again.

Examples:
    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.json"
    >>> write_text(path, json.dumps({"ok": 1}))
    >>> read_json(path)
    {'ok': 1}
    >>> _ = path.write_text('{"ok": ')  # torn
    >>> read_json(path) is None
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "read_json", "remove_stale_temporaries", "write_text"]

_TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[IO[Any]], object], *, binary: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path``, then ``os.replace`` it onto ``path``
    (Note [atomic files]); on any error the temporary file is removed and ``path`` is as it
    was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text))


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None when it is missing, or torn (empty, truncated, not JSON: said
    on stderr, so the caller treats it as missing and writes it again)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(
            f"steadystep: warning: {path} is torn ({len(text)} characters, not valid JSON; "
            "an interrupted write or a damaged copy): treated as missing",
            file=sys.stderr,
        )
        return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``run_dir``."""
    for tmp in Path(run_dir).rglob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
