"""edgecl: edge continual learner (SAFE, SLCA++, RanPAC, SimpleCIL)."""

__version__ = "0.1.0"
