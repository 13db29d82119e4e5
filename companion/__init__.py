"""Shared code of the LOSSGRAD companion notebooks.

- ``companion.data``: datasets (real, with download; synthetic stand-ins for the smoke profile)
- ``companion.models``: the paper's networks
- ``companion.baselines``: WNGrad, L4, SGD schedules, and ``make_optimizer``
- ``companion.store``: the run store (each finished run on disk under its identity; locks, digests)
- ``companion.train``: the training loop, tasks, ``Experiment`` (run identity; resume, skip finished runs)
- ``companion.runner``: where runs train (this process, worker processes, SLURM jobs), with progress
- ``companion.probes``: LOSSGRAD's probe on fresh or eval-mode dropout masks (notebook 08)
- ``companion.linesearch``: exact minimisers along a direction, measured along a run (notebook 10)
- ``companion.report``: figures and tables with the paper's numbers beside ours; reading one run (final metrics,
  epoch windows, the settled step size)
- ``companion.comparison``: optimizers compared across tasks and initialisations: rounds of runs, failures,
  ranks, tables and figures (notebook 09)
- ``companion.settling``: why LOSSGRAD's h settles low: tagged runs, the rows and figures of notebook 10's questions
- ``companion.profiles``: smoke / quick / paper, and where each one's outputs go
- ``companion.quadratic``: the 2-D quadratic of Section 3 (notebook 00)
"""

from . import (baselines, comparison, data, linesearch, models, probes, profiles, quadratic, report,  # noqa: F401
               runner, settling, store, train)
