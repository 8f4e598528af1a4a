"""Moved to :mod:`orchestrator.grid` (``trial``, ``progress``, ``tuner``). This module stays only
because Tune pickles a grid's callbacks and trial driver by module path (``tuner.pkl``), so
``mergenet run --resume`` of a grid started before the move finds them here. Delete it once no
such grid folder remains."""
from orchestrator.grid.progress import GridProgress  # noqa: F401
from orchestrator.grid.trial import trial_fn  # noqa: F401
from orchestrator.grid.tuner import GRID_FILE, run_grid  # noqa: F401
