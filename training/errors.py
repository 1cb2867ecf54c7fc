"""The user error that the training code itself raises (no torch import: train.py needs it
for `--help`-fast start-up checks)."""
from __future__ import annotations

from utils.errors import UserError


class TrainingInputError(UserError, ValueError):
    """A problem with the run's input found by the training code: the config against the data
    set, a checkpoint or pretrained file against the config, a run that only produces
    non-finite steps. The message names the file, key or value and what to do."""
