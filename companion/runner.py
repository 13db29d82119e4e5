"""Where a notebook's runs train: in the kernel, in local worker processes, or as cluster jobs.

Placeholder while the parallel runner is built: runs one after another in this process."""

from __future__ import annotations


def run_all(experiment, specs: list) -> list:
    """``specs``: ``(label, optimizer, seed, options)`` tuples; returns their results in order."""
    return [experiment.run(label, optimizer, seed, **options) for label, optimizer, seed, options in specs]
