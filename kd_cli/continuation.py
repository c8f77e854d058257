"""Whether a stopped run or a sweep folder that exists may go on, and the command line that
continues it. `resume=<run>` continues a run with the overrides it started with, `resume=<sweep>`
relaunches the sweep's own command, and a sweep launched into a folder that exists is continued
job by job: finished jobs kept, stopped ones resumed, changed ones refused. A run or job goes on
only with the config it recorded and the code, data and files it ran with, so that no result
mixes two versions (preflight checks this before Hydra writes anything)."""
from pathlib import Path

from omegaconf import OmegaConf

from .errors import KDError
from .run import RECORD, check_not_in_use, check_resume, recorded_config, state_of


def sweep_jobs(task_overrides):
    """The overrides of each job a basic-sweeper sweep of these task overrides launches, in
    Hydra's own order (job i runs the i-th), from Hydra's own splitting."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(overrides_parser().parse_overrides(list(task_overrides)), None)[0]


def overrides_parser():
    """Hydra's override parser, with the config loader of the Hydra context that is initialized
    (kd's preflight composes in one), so that a glob() sweep of a config group can list its
    options, as Hydra's own sweeper does; without one, glob() cannot be read."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    return OverridesParser.create(config_loader=loader)


def recorded(overrides):
    """A recorded list of overrides as typed: `teacher=${hydra:runtime.cwd}/t.pt` stays as it is
    (read item by item, OmegaConf would resolve it, and Hydra's resolver is set only in a run)."""
    return OmegaConf.to_container(overrides, resolve=False)


def sweep_overrides(stage, sweep_dir):
    """`kd <stage> resume=<sweep folder>`: the command line the sweep was launched with (from
    its multirun.yaml), so the same jobs run again into the same folders."""
    try:
        hydra = OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra
        started_as, task, own = hydra.job.name, recorded(hydra.overrides.task), recorded(hydra.overrides.hydra)
    except Exception as e:  # a damaged record: OmegaConf's errors have no common base
        raise KDError(f"{sweep_dir}/multirun.yaml is unreadable ({type(e).__name__}); the sweep cannot be "
                      "continued from it") from None
    if started_as != stage:
        raise KDError(f"{sweep_dir} is a {started_as} sweep; continue it with kd {started_as} resume={sweep_dir}")
    own = [o for o in own if o.split("=", 1)[0] not in ("hydra.mode", "hydra.sweep.dir", "hydra.run.dir")]
    return ["-m", *task, *own, f"hydra.sweep.dir={sweep_dir}"]


# keys whose recorded value may differ from the one composed now without changing what the rest
# of a stopped run trains: resume= itself (how a run goes on, not what it trains; a sweep's job
# resumed on its own records it); where teachers' logits are kept (no such key before 2026-12-04); the
# elastic distortion, off, where the run predates the key (2026-12-05); and precision=auto where
# the run recorded fp32, the default before auto: a resumed run's precision is its state's
# (prepare.device_of), fp32 for a state saved before auto. Not for a sweep's jobs not yet started,
# which would then train in another precision than its earlier jobs.
RESUMES_ACROSS = {"resume": lambda then, now: True,
                  "teacher_cache": lambda then, now: True,
                  "data.elastic": lambda then, now: then == "<absent>" and isinstance(now, dict) and now.get("scale") == 0,
                  "precision": lambda then, now: then == "fp32" and now == "auto"}
SWEEP_CONTINUES_ACROSS = {k: RESUMES_ACROSS[k] for k in ("resume", "teacher_cache", "data.elastic")}


def _first_difference(now, then, prefix="", allowed=None):
    for key in sorted(set(now) | set(then), key=str):
        a, b = now.get(key, "<absent>"), then.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.", allowed)
            if found:
                return found
        elif a != b and not (allowed and f"{prefix}{key}" in allowed and allowed[f"{prefix}{key}"](b, a)):
            return f"{prefix}{key}", a, b
    return None


# launchers whose jobs run on this machine, where preflight can tell what precision=auto settles to
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher")


def launches_here(launcher):
    """Whether the launcher (its _target_) runs its jobs on this machine."""
    return str(launcher).rsplit(".", 1)[-1] in LOCAL_LAUNCHERS


def check_sweep_continuation(stage, sweep_dir, jobs, compose_job, launcher="BasicLauncher", job_folders=None):
    """A sweep launched into a folder that exists continues it. Every job that already has a
    folder must have been launched with the same overrides it would be launched with now, and
    continue as it ran (check_job_continues); otherwise the sweep is refused by that job's name,
    before anything is written. A job's folder is <num>_* (kd's hydra.sweep.subdir), or the one
    in job_folders (a custom subdir, resolved per job). Returns whether any job is left to run."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return True
    if job_folders is None:
        folders = [next((p for p in sorted(sweep_dir.glob(f"{num}_*")) if (p / RECORD).is_dir()), None)
                   for num in range(len(jobs))]
    else:
        folders = [p if (p / RECORD).is_dir() else None for p in job_folders]
    # jobs that start afresh settle precision=auto where they run (here, for a local launcher), and
    # must settle it as the others did; with nothing left to run, no job mixes with another
    to_start = any(f is None or state_of(f) not in ("finished", "stopped") for f in folders)
    local = launches_here(launcher)  # its stopped jobs resume here, on the device it gives
    settles_here = to_start and local
    to_run = any(f is None or state_of(f) != "finished" for f in folders)
    again = f"continue the sweep with the command it started with (kd {stage} resume={sweep_dir}), or choose a " \
            "new hydra.sweep.dir"
    for num, (job, folder) in enumerate(zip(jobs, folders)):
        if folder is None:
            continue  # never started: it runs
        check_not_in_use(folder)
        check_job_continues(folder, compose_job, settles_here, again, inputs=to_run, launched_as=(num, job),
                            runs_here=local)
    return to_run


def check_job_continues(folder, compose_job, settles_here, again, inputs=True, launched_as=None, runs_here=True):
    """A job of a sweep or search continues only as it ran: with the overrides it recorded (a
    sweep's job `launched_as` (number, overrides) must have recorded those), composing the config
    it recorded (a config file may have changed since), and, where jobs are left to run (`inputs`),
    with the code, data, checkpoint files and settled precision it ran with, and a stopped job on
    the kind of device it began on (provenance.py);
    settles_here: some job will start afresh on this machine, settling precision=auto here;
    runs_here: a stopped job resumes on this machine (a local launcher), on the device it gives."""
    from . import provenance

    overrides, config = recorded_config(folder)
    # a job resumed on its own recorded resume= too: how it went on, not what it ran with
    overrides = [o for o in overrides if not o.startswith("resume=")]
    if launched_as is not None and overrides != launched_as[1]:
        num, job = launched_as
        raise KDError(f"sweep job {Path(folder).name} ran with [{' '.join(overrides)}], and this sweep would run "
                      f"job {num} with [{' '.join(job)}]; {again}")
    composed = compose_job(overrides)
    differs = _first_difference(OmegaConf.to_container(composed), config, allowed=SWEEP_CONTINUES_ACROSS)
    if differs:
        key, now, then = differs
        raise KDError(f"sweep job {Path(folder).name} ran with {key}={then!r}, and this sweep would run it with "
                      f"{key}={now!r}; {again}")
    if inputs:
        provenance.check_sweep_job(folder, composed, precision_now=_auto_precision(composed.device)
                                   if settles_here and "precision" in composed else None, device_here=runs_here)


def _auto_precision(device):
    from .prepare import auto_precision, device_named

    return auto_precision(device_named(device))


def check_resume_config(run_dir, config_now):
    """A stopped run continues only with the config it started with: the same command composes
    another config once a config file (a recipe's epochs, lr, T) has changed since, and the rest of
    the run would silently train with it."""
    _, config = recorded_config(run_dir)
    differs = _first_difference(config_now, config, allowed=RESUMES_ACROSS)
    if differs:
        key, now, then = differs
        raise KDError(f"{run_dir} started with {key}={then!r}, and its command now gives {key}={now!r} (a config "
                      "file changed since); restore it to resume, or start a new run")


def resume_overrides(stage, overrides):
    """`kd <stage> resume=<run dir>` continues that run in that folder with the overrides it
    started with (from its .hydra/overrides.yaml), so it ends exactly as if never stopped;
    `resume=<sweep dir>` relaunches the sweep's own command into its folder (continued job by job, above)."""
    wanted = [o for o in overrides if o.startswith("resume=")]
    if not wanted:
        return overrides
    if len(wanted) != len(overrides):
        raise KDError("resume=<run dir> takes no other arguments: the run continues with the config it started with")
    import yaml

    run_dir = Path(wanted[-1].split("=", 1)[1])
    if (run_dir / "multirun.yaml").is_file():
        return sweep_overrides(stage, run_dir)
    try:
        original = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        started_as = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["name"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise KDError(f"{run_dir} is not a kd run folder (no readable .hydra/overrides.yaml in it)") from None
    if started_as != stage:
        raise KDError(f"{run_dir} is a {started_as} run; resume it with kd {started_as} resume={run_dir}")
    check_resume(run_dir)  # before Hydra rewrites anything in that folder
    check_not_in_use(run_dir)
    return [*(o for o in original if not o.startswith("resume=")), f"resume={run_dir}", f"hydra.run.dir={run_dir}"]
