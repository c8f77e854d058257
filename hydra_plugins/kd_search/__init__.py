"""Hydra finds sweepers only under the hydra_plugins namespace: this is kd's, a thin shell around
kd_cli/search.py. Without the optuna extra there is nothing to define (and nothing for Hydra's
plugin scan to warn about)."""
try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pip install 'kd-cli[optuna]' brings it
    KdSearch = None
else:

    class KdSearch(OptunaSweeper):
        """Hydra's Optuna sweeper whose study continues where a stopped search left off."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            from kd_cli.search import Search

            self.sweeper = Search(**kwargs)
