"""Hyper-parameter selections and diagnostics: scripts that decided a setting or explained a
result, kept so that docs/ can name the command behind each decision. experiments/README.md
lists them with what each decided and where docs/ records it.

Run from the repository root: ``python -m experiments.NAME --help``. They share the helpers of
``benchmarks.common`` (the reuse of finished quick-protocol runs, the tables and the results
writer); the figures cited in README.md and docs/ come from the suites (``python -m benchmarks``).
"""
