"""The benchmark suites: each prints a figure that README.md or docs/ cites, as a Markdown table,
and writes it with machine-readable results (``results.json``) to its ``--out`` folder.

Run from the repository root::

    python -m benchmarks --help            # the suites, one line each
    python -m benchmarks SUITE --help      # a suite's options
    python -m benchmarks SUITE [options]

One module per suite; :mod:`benchmarks.common` holds what they share (the reuse of finished
quick-protocol runs, mean ± std, the Markdown table and the results writer). Hyper-parameter
selections and diagnostics are in ``experiments/``.
"""
