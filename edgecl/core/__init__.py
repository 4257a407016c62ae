"""The torch-free core every stage may import (docs/DESIGN.md, "Layering").

- :mod:`.errors`: :class:`~.errors.EdgeclError`, the one-line user error;
- :mod:`.durable`: durable, atomic writes of files and directories (one scheme) and a file lock;
- :mod:`.formats`: the artifacts handed between stages as typed records (bundle manifest,
  engine-directory manifest, store records) and their tensor names;
- :mod:`.classstats`: per-class Gaussian statistics (SLCA's alignment, device enrollment);
- :mod:`.extras`: the optional dependencies and the pip extra that brings each.

Standard library and numpy only.
"""
