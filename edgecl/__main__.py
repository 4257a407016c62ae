"""``python -m edgecl``: the command line (``torchrun --standalone --nproc_per_node N -m edgecl train ...``)."""

from edgecl.cli import main

if __name__ == "__main__":
    main()
