"""The Hydra callback that tells kd, in the launching process, which sweep just ended."""
from pathlib import Path

from hydra.experimental.callback import Callback

finished = []  # sweep folders whose jobs have all ended, whichever launcher ran them


class SweepEnd(Callback):
    """Once every job of a sweep ended (in this process or in launcher workers), remember the
    sweep folder so kd can report on it and exit non-zero on failures."""

    def on_multirun_end(self, config, **kwargs):
        finished.append(Path(config.hydra.sweep.dir))
