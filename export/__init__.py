"""edgecl.export (see DESIGN.md)."""
