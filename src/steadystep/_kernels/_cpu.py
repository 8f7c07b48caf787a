"""Compile, cache and load the multi-tensor CPU kernels (``kernels_*.c``).

Note [CPU kernels]
    The C sources are compiled on first use by the system C compiler (``$CC``, else ``cc``) into a
    shared library, one per configuration (parameter dtype and the structural choices that the
    ``SS_*`` macros select), and loaded with :mod:`ctypes`. A library is cached on disk under a
    name that hashes the sources, the macros, the flags and this CPU's features, so
    a later process loads it in milliseconds; compiling one takes about half a second. The cache
    is ``$STEADYSTEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/steadystep``, else
    ``~/.cache/steadystep`` (a temporary folder when none of these is writable). Libraries are
    written to a temporary name and renamed into place, so concurrent processes never load a
    half-written file. No compiler, or a failed build, makes :func:`library` return None (with
    one warning), and the optimizers fall back to their ``torch._foreach`` paths.

    ctypes releases the GIL for the call; the library starts its own threads (pthreads), as many
    as ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from steadystep._kernels.layout import ALERA_HYPER_FIELDS, CPROP_HYPER_FIELDS

__all__ = ["AleraHyper", "Hyper", "cache_dir", "library"]

_HERE = Path(__file__).resolve().parent
_SOURCES = (
    _HERE / "kernels_cprop.c",
    _HERE / "kernels_alera.c",
    _HERE / "kernels_rollback.c",
    _HERE / "kernels_detect.c",
    _HERE / "kernels_ladder.c",
)
_HEADERS = (_HERE / "kernels_common.h", _HERE / "kernels_values.h")
_FLAGS = (
    "-O3",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-math-errno",
    # -fno-trapping-math lets GCC turn the loops' selects (clamps, max/min) into blends and
    # vectorize them; without it CPropAdamW's step stays scalar, with a branch per clamp. A
    # blend evaluates both sides, so the kernels flush subnormals (Note [subnormals in the
    # kernels] in kernels_common.h).
    "-fno-trapping-math",
    "-fopenmp-simd",
)
_LOCK = threading.Lock()
_LOADED: dict[tuple[tuple[str, int], ...], ctypes.CDLL | None] = {}


_C_TYPES = {"double": ctypes.c_double, "int": ctypes.c_int}


class Hyper(ctypes.Structure):
    """``hyper_t`` of kernels_cprop.c: the hyperparameters of one call (Note [hyperparameter
    layout])."""

    _fields_ = [(name, ctypes.c_double) for name in CPROP_HYPER_FIELDS]


class AleraHyper(ctypes.Structure):
    """``alera_hyper_t`` of kernels_alera.c (Note [hyperparameter layout])."""

    _fields_ = [(name, _C_TYPES[kind]) for name, kind in ALERA_HYPER_FIELDS]


def cache_dir() -> Path:
    """Where compiled libraries are kept (see Note [CPU kernels])."""
    root = os.environ.get("STEADYSTEP_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "steadystep"


@functools.lru_cache(maxsize=1)
def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    parts = [platform.system(), platform.machine(), sys.platform]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                if len(parts) > 6:
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return cc if shutil.which(cc) else None


def _build(cc: str, defines: list[str], out: Path) -> str | None:
    """Compile the source into ``out``; None on success, else the compiler's message."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        last = ""
        # -march=native where the compiler knows it (not every clang does); plain otherwise
        for arch in (["-march=native"], []):
            cmd = [cc, *_FLAGS, *arch, *defines, *map(str, _SOURCES), "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return None
            last = proc.stderr.strip() or proc.stdout.strip()
        return last
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _path_for(defines: list[str]) -> Path:
    digest = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        digest.update(path.read_bytes())
    for part in (*_FLAGS, *defines, _cpu_signature()):
        digest.update(part.encode() + b"\0")
    return cache_dir() / f"kernels-{digest.hexdigest()[:20]}.so"


def library(config: dict[str, int]) -> ctypes.CDLL | None:
    """The compiled kernels for ``config`` (``SS_*`` macro values), or None if they cannot be
    built here (one warning per process)."""
    key = tuple(sorted(config.items()))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        defines = [f"-D{name}={value}" for name, value in key]
        lib = None
        path = _path_for(defines)
        error = None
        if not path.exists():
            cc = _compiler()
            if cc is None:
                error = "no C compiler found (set $CC or install gcc/clang)"
            else:
                try:
                    error = _build(cc, defines, path)
                except (OSError, subprocess.SubprocessError) as e:
                    error = str(e)
                if error is not None and not _writable(path.parent):
                    # a read-only cache: build into a temporary folder instead
                    path = Path(tempfile.gettempdir()) / "steadystep" / path.name
                    error = _build(cc, defines, path)
        if error is None:
            try:
                lib = _declare(ctypes.CDLL(str(path)))
            except OSError as e:
                error = str(e)
        if error is not None:
            _warn_once(error)
        _LOADED[key] = lib
        return lib


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


_WARNED = False


def _warn_once(error: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "steadystep could not build its fused CPU kernels, so the optimizers use their "
            f"slower torch._foreach paths: {error.splitlines()[0] if error else 'unknown'}",
            RuntimeWarning,
            stacklevel=3,
        )


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types of the exported functions (pointer arrays pass as void pointers)."""
    i64, p, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    hyper = ctypes.POINTER(Hyper)
    lib.ss_grads_ok.argtypes = [i64, p, p, ctypes.c_double, p, p, c_int]
    lib.ss_adam.argtypes = [i64, p, p, p, p, p, p, p, p, p, hyper, p, p, c_int]
    lib.ss_sgd.argtypes = [i64, p, p, p, p, p, p, p, hyper, p, p, c_int]
    lib.ss_wrap_before.argtypes = [i64, p, p, p, p, p, p, p, hyper, p, c_int]
    lib.ss_wrap_after.argtypes = [i64, p, p, p, p, p, p, hyper, p, c_int]
    # n, 12 pointer arrays, then the units, the counters, the mirrors and the flags
    lib.ss_alera.argtypes = [
        *(i64, *[p] * 12),
        *(i64, p, p, p),
        *(i64, p),
        *(i64, p, p, p, p),
        ctypes.POINTER(AleraHyper),
        c_int,
    ]
    lib.ss_rollback.argtypes = [i64, p, p, p, p, p, c_int]
    # the state, the copies revert() restores, the counters, loss, grad_norm, skip, hyper, alarm
    window = [*[p] * 11, p, c_int, p, c_int, p, p, p]
    lib.ss_window_update_float.argtypes = window
    lib.ss_window_update_double.argtypes = window
    exported = ("ss_grads_ok", "ss_adam", "ss_sgd", "ss_wrap_before", "ss_wrap_after", "ss_alera")
    windows = ("ss_window_update_float", "ss_window_update_double")
    # the flags, the two values with their dtype codes, the 12 state tensors, hyper, 5 outputs
    lib.ss_ladder_step.argtypes = [p, p, p, c_int, p, c_int, *[p] * 12, p, *[p] * 5]
    for name in (*exported, "ss_rollback", *windows, "ss_ladder_step"):
        getattr(lib, name).restype = c_int
    return lib
