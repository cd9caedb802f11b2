"""The benchmark scripts of lightning_spectral (not installed with the package).

Run each one as a module from the repository root, e.g. ``python -m benchmarks.bench_gate
--quick``; ``python -m benchmarks.run_all`` runs them all and assembles ``RESULTS.md``. Shared
helpers live in :mod:`benchmarks._common`.
"""
