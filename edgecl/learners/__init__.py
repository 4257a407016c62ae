"""Learners, one module each, all driven by :func:`edgecl.learners.base.run_sessions`."""

from __future__ import annotations

import importlib

from ..core.errors import EdgeclError

# method name -> (module, class)
REGISTRY = {
    "simplecil": ("edgecl.learners.simplecil", "SimpleCIL"),
    "ranpac": ("edgecl.learners.ranpac", "RanPAC"),
    "safe": ("edgecl.learners.safe", "SAFE"),
    "seqft": ("edgecl.learners.slca", "SeqFT"),
    "slca": ("edgecl.learners.slca", "SLCA"),
    "slcapp": ("edgecl.learners.slca", "SLCAPlusPlus"),
}


def register_learner(method: str, module: str, cls: str) -> None:
    """Add a method: ``edgecl train --method METHOD`` builds ``module.cls`` (a :class:`~.base.Learner`)."""
    REGISTRY[method] = (module, cls)


def learner_class(method: str):
    if method not in REGISTRY:
        raise EdgeclError(f"unknown method {method!r} (--method); available: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[method]
    return getattr(importlib.import_module(module), cls)
