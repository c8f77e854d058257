"""`kd <stage> -m hparams_search=<stage>`: Hydra's Optuna sweeper, minimising validation errors,
with a study that lives in the sweep folder and continues where a stopped search left off.

Where kd departs from the stock sweeper, and why:
- trial number == job number == job folder. The stock sweeper numbers jobs from 0 on every launch,
  so a continued study would write its new trials into the old trials' folders.
- n_trials is the study's total, not "this many more": the same command (the same
  hydra.sweep.dir, or kd <stage> resume=<sweep folder>) finishes the same search.
- a trial that a killed search left running is run again in its own folder, where kd resumes it
  from its state.pt (a trial killed before its first saved state starts again from scratch).
- each trial's sampler is seeded from (sampler.seed, its trial number), so a continued search
  proposes what an unbroken one would have (given the same results: kd runs are deterministic).
- a trial that fails, diverges or reports no validation errors is told to the study as failed,
  and the search goes on (hydra.sweeper.max_failure_rate is not used: failures never end it).
"""
import logging
import math
import os
from pathlib import Path

os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")  # optuna 2.10 uses the 1.x API, pinned; read on import

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from hydra.core.utils import JobStatus  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

log = logging.getLogger("kd")
OBJECTIVE = "val_errors"      # metrics.json's key that a search minimises; never test errors
OVERRIDES = "kd_overrides"    # trial user attribute: its overrides, to run it again in its folder
RESULTS = "optimization_results.yaml"


def objective(returned):
    """A kd job's return value (its metrics) -> its validation errors; None when it has none."""
    value = returned.get(OBJECTIVE) if isinstance(returned, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class Search(OptunaSweeperImpl):
    def sweep(self, arguments):
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        space = {**(self.search_space_distributions or {}), **space}
        for name in fixed:
            space.pop(name, None)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)  # the study's SQLite file lives there
        # what was launched, as Hydra's grid sweeper records it: kd report and resume= read it
        OmegaConf.save(self.config, Path(self.sweep_dir) / "multirun.yaml")
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    direction=self._get_directions()[0], load_if_exists=True)
        log.info("study %s in %s: %d trial(s) so far of %d", study.study_name, self.storage,
                 len(study.trials), self.n_trials)
        for trial in [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]:
            if OVERRIDES not in trial.user_attrs:  # killed between asking for it and launching it
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                continue
            log.info("trial %d was left running: running it again in its folder", trial.number)
            self._run(study, [trial.number], [trial.user_attrs[OVERRIDES]])
        while len(study.trials) < self.n_trials:
            batch, overrides = [], []
            for _ in range(min(self.n_jobs, self.n_trials - len(study.trials))):
                self._seed_sampler(study, len(study.trials))
                trial = study.ask()
                [trial_overrides] = self._configure_trials([trial], space, fixed)
                trial.set_user_attr(OVERRIDES, list(trial_overrides))
                batch.append(trial.number)
                overrides.append(list(trial_overrides))
            self._run(study, batch, overrides)
        self._write_results(study)

    def _seed_sampler(self, study, number):
        sampler = OmegaConf.select(self.config, "hydra.sweeper.sampler")
        if sampler is not None and sampler.get("seed") is not None:  # (seed, k) mixed: seeds k and k+3 draw apart
            seed = int(np.random.SeedSequence([int(sampler.seed), number]).generate_state(1)[0])
            study.sampler = instantiate(sampler, seed=seed)

    def _run(self, study, numbers, overrides):
        """Launch trials numbered consecutively from numbers[0] and tell the study each result."""
        returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
        for number, ret in zip(numbers, returns):
            value = objective(ret.return_value) if ret.status == JobStatus.COMPLETED else None
            if value is None:
                log.warning("trial %d failed or reported no validation errors: recorded as failed", number)
                study.tell(number, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(number, value)

    def _write_results(self, study):
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            log.warning("no trial of the study finished: no best trial")
            return
        best = min(done, key=lambda t: (t.value, t.number))  # the first of equals, as kd report names it
        log.info("best trial %d: %s, %g validation errors", best.number, best.params, best.value)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_trial": best.number, "best_params": best.params,
                                         "best_value": best.value, "objective": OBJECTIVE}),
                       Path(self.sweep_dir) / RESULTS)
