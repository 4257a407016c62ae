"""edgecl.calibration (see DESIGN.md)."""
