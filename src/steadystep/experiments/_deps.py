"""The optional packages of the ``exp`` extra, and one clear error when one is missing.

``pip install steadystep`` installs the optimizers only (torch, numpy); the experiments also need
matplotlib (figures), tqdm (progress bars), scikit-learn (the embedded ``digits`` and ``crops``
datasets) and mnist1d (the embedded ``mnist1d`` dataset), which ``pip install 'steadystep[exp]'``
installs. Every import of one of them goes through :func:`require`, so a missing package is a
:class:`MissingDependencyError` naming the package and the extra, never a bare
``ModuleNotFoundError`` from deep inside a run; the command checks the ones a run will need
before it starts (:func:`missing`) and turns the error into one line and exit code 2.

Examples:
    >>> from steadystep.experiments._deps import require
    >>> require("json", "a test").__name__
    'json'
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

__all__ = [
    "DATASET_MODULES",
    "INSTALL_HINT",
    "PACKAGES",
    "MissingDependencyError",
    "missing",
    "require",
]

# import name -> distribution name (what pip installs)
PACKAGES = {
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "mnist1d": "mnist1d",
}
# the packages an embedded dataset is generated or read with
DATASET_MODULES = {"mnist1d": ("mnist1d",), "digits": ("sklearn",), "crops": ("sklearn",)}
INSTALL_HINT = (
    "pip install 'steadystep[exp]' (from a clone of the repository: pip install -e '.[exp]')"
)


class MissingDependencyError(ImportError):
    """A package of the ``exp`` extra is not installed; the message names it and the extra.

    Examples:
        >>> err = MissingDependencyError(["sklearn"], "the embedded dataset crops")
        >>> "scikit-learn" in str(err) and "steadystep[exp]" in str(err)
        True
    """

    def __init__(self, modules: Iterable[str], needed_for: str) -> None:
        self.modules = list(modules)
        names = ", ".join(f"{PACKAGES.get(m, m)} (import {m})" for m in self.modules)
        super().__init__(
            f"missing optional package{'s' if len(self.modules) > 1 else ''} {names}, needed "
            f"for {needed_for}; install the 'exp' extra: {INSTALL_HINT}"
        )


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (e.g. ``"mnist1d.data"``); when it cannot be imported, a
    :class:`MissingDependencyError` naming its package, what needed it (e.g. ``"the embedded
    dataset crops"``) and the ``exp`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError([module.split(".")[0]], needed_for) from e


def missing(modules: Iterable[str]) -> list[str]:
    """Those of ``modules`` that cannot be imported, in the order given (each imported once)."""
    return [m for m in dict.fromkeys(modules) if not _importable(m)]
