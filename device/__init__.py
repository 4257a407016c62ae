"""edgecl.device: the torch-free device runtime (docs/DESIGN.md, docs/DEVICE.md)."""
