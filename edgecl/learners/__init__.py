"""Learners, one module each, all driven by :func:`edgecl.learners.base.run_sessions`."""

from __future__ import annotations

import importlib

from ..errors import EdgeclError

# method name -> (module, class); methods owned by later work say so clearly.
REGISTRY = {
    "simplecil": ("edgecl.learners.simplecil", "SimpleCIL"),
    "ranpac": ("edgecl.learners.ranpac", "RanPAC"),
    "safe": ("edgecl.learners.safe", "SAFE"),
    "seqft": ("edgecl.learners.slca", "SeqFT"),
    "slca": ("edgecl.learners.slca", "SLCA"),
    "slcapp": ("edgecl.learners.slca", "SLCAPlusPlus"),
}
NOT_BUILT: dict = {}


def learner_class(method: str):
    if method in NOT_BUILT:
        raise EdgeclError(f"--method {method}: {NOT_BUILT[method]} is not built yet; available: {', '.join(REGISTRY)}")
    if method not in REGISTRY:
        raise EdgeclError(f"unknown method {method!r} (--method); available: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[method]
    return getattr(importlib.import_module(module), cls)
