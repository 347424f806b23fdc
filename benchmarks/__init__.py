"""Benchmarks of what the pack adds on top of the service's own time; run ``python -m benchmarks``.

Nothing here is imported by the pack or by its tests.
"""
