"""edgecl.device (see DESIGN.md)."""
