"""edgecl.export: bundle -> engine directory (docs/DESIGN.md, docs/EXPORT.md)."""
