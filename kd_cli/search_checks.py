"""A search's checks (kd <stage> -m hparams_search=...), before any trial runs: it needs -m and a
validation split to minimise, every end of every range must be a value kd accepts, and a search
launched into a folder that holds one must be the same search, each trial it ran continuing as it
ran. search.py is the search itself (it imports Optuna, which a plain run does not need)."""
from pathlib import Path

from omegaconf import OmegaConf

from . import continuation, run
from .config import typed_key
from .errors import KDError
from .job_checks import first_values


SEARCHABLE = ("train_teacher", "train_student", "distill")  # stages with conf/hparams_search/<name>.yaml


SEARCH_NEEDS_VALIDATION = ("a search minimises validation errors: set data.val_size (e.g. 10000); the test set is "
                           "never its objective")


def check_search(stage, cfg, multirun, check_value):
    """A search (hparams_search=...) needs -m and a validation split to minimise, and every end
    of every range it searches must be a value kd accepts."""
    if not multirun:
        raise KDError(f"hparams_search runs a search of many runs: add -m (kd {stage} -m hparams_search=...)")
    if cfg.hydra.sweeper.n_jobs < 1 or str(cfg.hydra.sweeper.direction) not in ("minimize", "Direction.minimize"):
        raise KDError("a search runs n_jobs >= 1 trials at a time and minimises validation errors: "
                      "hydra.sweeper.n_jobs=1 (or more), hydra.sweeper.direction=minimize")
    if not cfg.data.val_size:
        raise KDError(SEARCH_NEEDS_VALIDATION)
    if str(OmegaConf.select(cfg, "hydra.sweeper.sampler._target_", default="")).endswith("GridSampler"):
        raise KDError(f"for a grid, use kd's own sweep: kd {stage} -m key=a,b,c (no hparams_search)")
    space = OmegaConf.to_container(cfg.hydra.sweeper.params or {})
    for key in space:
        if OmegaConf.select(cfg, key, default=None) is None and key not in cfg.hydra.runtime.choices:
            raise KDError(f"the search space has {key}, which kd {stage} does not; "
                          f"use hparams_search={stage.replace('-', '_')} or drop hydra.sweeper.params.{key}")
    fixed, ends = first_values([f"{k}={v}" for k, v in space.items()])
    for line in fixed:  # a value the space fixes
        check_value(typed_key(line), [line])
    for key, lines in ends.items():
        check_value(key, lines)


def check_search_continuation(stage, cfg, task, compose_trial):
    """A search launched into a folder that holds one continues it, so it must be the same search:
    the same typed overrides, space and sampler (only hydra.sweeper.n_trials may grow), and each
    trial it ran must continue as it ran (continuation.check_job_continues: its config, code, data,
    teachers): a changed config file would otherwise make the study mix two objectives."""
    record = Path(cfg.hydra.sweep.dir) / "multirun.yaml"
    if not record.is_file():
        return
    try:
        then = OmegaConf.load(record).hydra
        same = {"overrides": sorted(continuation.recorded(then.overrides.task)) == sorted(task),
                "hydra.sweeper.params": then.sweeper.params == cfg.hydra.sweeper.params,
                "hydra.sweeper.sampler": then.sweeper.sampler == cfg.hydra.sweeper.sampler,
                "hydra.sweeper._target_": then.sweeper._target_ == cfg.hydra.sweeper._target_}
    except Exception:  # a damaged record, or a grid sweep's (no params): not a search to continue
        same = {"its multirun.yaml": False}
    changed = [k for k, ok in same.items() if not ok]
    if changed:
        raise KDError(f"{record.parent} holds another sweep or search ({', '.join(changed)} differ); continue it "
                      f"with kd {stage} resume={record.parent} (hydra.sweeper.n_trials=N may be added), or choose "
                      "a new hydra.sweep.dir")
    again = f"continue the search as it ran (kd {stage} resume={record.parent}), or choose a new hydra.sweep.dir"
    local = continuation.launches_here(cfg.hydra.launcher._target_)
    for trial in sorted(p for p in record.parent.glob("[0-9]*_*") if (p / run.RECORD).is_dir()):
        run.check_not_in_use(trial)
        continuation.check_job_continues(trial, compose_trial, settles_here=local, again=again, runs_here=local)
