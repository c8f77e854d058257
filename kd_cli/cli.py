"""`kd <stage> [key=value ...]`: argv[1] picks the stage, the rest goes to Hydra."""
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import continuation, run
from .config import typed_key
from .errors import KDError
from .preflight import CONFIG_MODULE, check_overrides, quote_paths, sweep_in

# stage -> (primary config name, one line for `kd --help`). A new stage: this, stages.STAGES (its
# function), conf/<config>.yaml with hydra.job.name = the stage, and search_checks.SEARCHABLE if it
# has conf/hparams_search/<config>.yaml
STAGES = {
    "train-teacher": ("train_teacher", "train the 784-1200-1200-10 teacher (dropout, max-norm, jitter)"),
    "train-student": ("train_student", "train the 784-800-800-10 student on hard labels (the baseline)"),
    "distill": ("distill", "train the student on the teacher's soft targets at temperature T"),
    "evaluate": ("evaluate", "count a checkpoint's test errors: total, per class, confusion matrix"),
    "train-specialists": ("train_specialists", "specialists for the classes a generalist confuses (paper, section 5)"),
}
REPORT_HELP = "sweep or run folders -> report.md, report.csv, a plot of test errors vs T, learning curves"

USAGE = """usage: kd <stage> [key=value ...] [-m] [--help] [--cfg job]

Knowledge distillation experiments (Hinton, Vinyals & Dean 2015) on MNIST.

stages:
{stages}

Each run writes checkpoint.pt, metrics.json and .hydra/ under outputs/<stage>/<timestamp>/ and
ends by printing its test errors. `kd <stage> --help` lists that stage's keys;
`kd <stage> -m key=a,b` sweeps (in parallel: hydra/launcher=joblib); `kd report <sweep dir>`
tabulates and plots one. Data: set KD_DATA_ROOT to the folder that holds MNIST/raw.
"""

# Hydra flags that only print or inspect: no run, so no value checks before them
INSPECT_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--resolve", "--shell-completion", "-sc")


def _fail(message):
    print(f"kd: error: {message}", file=sys.stderr)


def installed(cmd):
    """A `kd ...` command as a process runs it: the kd installed beside the Python running this (a
    virtual environment's bin/), else the one on PATH. So `.venv/bin/python scripts/...` finds kd
    without the environment activated; the scripts print and record commands as `kd ...`."""
    if cmd[0] != "kd":
        return cmd
    beside = Path(sys.executable).parent / "kd"
    return [str(beside) if beside.is_file() else shutil.which("kd") or "kd", *cmd[1:]]


def threads_per_job(n_jobs):
    """Torch threads for each of n_jobs runs side by side: an equal share (at least 1) of the cores
    this process may use. Counted from its CPU affinity, which a cpuset or taskset narrows, not
    from os.cpu_count(), the machine's cores: 2 allowed of 16 means 1 thread each for 2 jobs, not 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // n_jobs)


def _share_cores(hc):
    """Jobs that run side by side (the joblib launcher's n_jobs) split the cores between them
    instead of each starting one torch thread per core and fighting over them."""
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None) if hc.get("launcher") else None
    if isinstance(n_jobs, int) and n_jobs != 1:
        import torch

        torch.set_num_threads(1 if n_jobs < 1 else threads_per_job(n_jobs))  # n_jobs -1: a job per core


def _task(stage):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from . import stages
    from .stopping import Interrupted
    from .train import Diverged

    def task(cfg):
        hc = HydraConfig.get()
        _share_cores(hc)
        out, multirun = hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(run.hold(out))
            except KDError as e:  # another process trains in this folder: write nothing into it
                _fail(str(e))
                sys.exit(2)
            log = logging.getLogger("kd")
            if multirun:  # a sweep launched into its own folder again continues it
                held = run.state_of(out)
                if held == "finished":
                    print(f"job {hc.job.num} finished before; kept as it is", flush=True)
                    return json.loads(Path(out, run.METRICS).read_text())
                if held == "stopped" and "resume" in cfg:
                    with open_dict(cfg):
                        cfg.resume = out
                Path(out, run.ERROR).unlink(missing_ok=True)  # a failed job runs again
            try:
                metrics = stages.STAGES[stage](cfg, out)
            except Interrupted as e:  # state saved: say how to continue, and end the whole sweep
                again = f"kd {stage} resume={hc.sweep.dir if multirun else out}"
                _fail(f"{e}; state saved. Continue with: {again}" if e.saved else
                      f"{e}; kd {stage} keeps no resumable state: run it again")
                sys.exit(e.exit_code)
            except Exception as e:
                if not isinstance(e, KDError) and not multirun:
                    raise  # a bug: its traceback is what a report needs
                message = str(e) if isinstance(e, KDError) else f"{type(e).__name__}: {e}"
                if isinstance(e, Diverged):
                    run.record_failure(out, message)  # and no state.pt that invites resuming
                else:
                    run.record_error(out, message)
                if multirun:  # let the other jobs of the sweep run
                    log.error("job %s failed: %s", hc.job.num, message)
                    return None
                _fail(message)
                sys.exit(2)
            print(f"test errors: {metrics['test_errors']} / {metrics['test_total']}", flush=True)
            return metrics

    return task


def _pin_newest_teacher(stage, overrides):
    """`teacher` (distill) and `generalist` (train-specialists) left unset mean the newest teacher
    under outputs/: find it once, now, and pass it as teacher=<path>. Left to each job, a sweep's
    jobs could each take another teacher (one trained while the sweep ran, or before it was
    continued), and its recorded overrides, its report and the continuation check would not show it.
    Returns the overrides and the line that says which checkpoint it took (None if it took none),
    printed once the command passed its checks (above a refusal it would read as the cause)."""
    key = {"distill": "teacher", "train-specialists": "generalist"}.get(stage)
    typed = {typed_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    if key is None or typed.get(key, "null") not in ("null", ""):
        return overrides, None
    from .checkpoint import newest_checkpoint
    from .teachers import TEACHER_STAGE

    newest = newest_checkpoint("outputs", TEACHER_STAGE)
    if newest is None:  # left unset: preflight says there is none, after the values are checked
        return overrides, None
    # said, since the newest by file time may be a smoke run trained after the one meant
    said = f"kd: {key}={newest.resolve()} (the newest kd train-teacher checkpoint under outputs/)"
    return [*(o for o in overrides if typed_key(o) != key), f"{key}={newest.resolve()}"], said


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"  {s:<18} {d}" for s, (_, d) in STAGES.items()] + [f"  {'report':<18} {REPORT_HELP}"]
        print(USAGE.format(stages="\n".join(lines)))
        return 0
    stage, overrides = argv[0], argv[1:]
    if stage == "report":
        from .report import main as report_main

        try:
            print(report_main(overrides, REPORT_HELP))
        except KDError as e:
            _fail(str(e))
            return 2
        return 0
    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)} (kd --help)")
        return 2
    config_name = STAGES[stage][0]
    inspect_only = any(a.split("=")[0] in INSPECT_FLAGS for a in overrides)
    # with -m, Hydra shows help, and ends in a traceback for the others
    shows_one_job = [a for a in overrides if a.split("=")[0] in INSPECT_FLAGS and a not in ("--help", "-h", "--hydra-help")]
    if shows_one_job and any(o in ("-m", "--multirun") for o in overrides):
        _fail(f"{shows_one_job[0]} shows one job: drop -m, and give one value per key")
        return 2
    typed = [o for o in overrides if "=" in o and not o.startswith("-")]  # not the flags' own words (job)
    swept = sweep_in(quote_paths(typed)) if shows_one_job else None
    if swept:  # Hydra would end in a three-line error
        _fail(f"{shows_one_job[0]} shows one job: {swept} sweeps; give one value per key")
        return 2
    pinned = None
    try:
        if not inspect_only:
            resuming = any(o.startswith("resume=") for o in overrides)
            overrides = continuation.resume_overrides(stage, overrides)  # reads resume=<dir> as typed
            if not resuming:
                overrides, pinned = _pin_newest_teacher(stage, overrides)
        # Hydra's parser wants -m before the overrides; users put it anywhere (kd distill T=1,2 -m)
        flags = [o for o in overrides if o in ("-m", "--multirun")]
        overrides = [*flags, *quote_paths(o for o in overrides if o not in flags)]
        if not inspect_only:
            check_overrides(stage, config_name, overrides)
    except KDError as e:
        _fail(str(e))
        return 2
    if pinned:
        print(pinned, file=sys.stderr, flush=True)

    import hydra

    from .jobs import is_search_folder
    from .sweep_end import finished

    _register_search()
    finished.clear()  # kd called again in one process (the tests do) reports only its own sweep
    argv_before, sys.argv = sys.argv, [f"kd {stage}", *overrides]
    try:
        hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")(_task(stage))()
    except KeyboardInterrupt:
        _fail("interrupted; this run wrote no checkpoint (checkpoints are only ever written whole)")
        return 130
    finally:
        sys.argv = argv_before

    for sweep in finished:
        failed = sorted(sweep.glob(f"*/{run.ERROR}"))
        _report_quietly(sweep)
        if failed and is_search_folder(sweep):  # failures are part of a search: recorded in the study, reported
            print(f"kd: {len(failed)} trial(s) failed and are recorded as failed: {sweep / 'report.md'}",
                  file=sys.stderr)
        elif failed:
            _fail(f"{len(failed)} job(s) of the sweep failed:\n  " + "\n  ".join(
                f"{f.parent.name}: {f.read_text().strip()}" for f in failed))
            return 1
    return 0


def _register_search():
    """Hydra finds sweepers by walking the hydra_plugins namespace, which setuptools' editable
    install (pip install -e) hides from it: hand kd's search sweeper to Hydra's registry directly."""
    try:
        from hydra_plugins.kd_search import KdSearch  # None without the optuna extra
    except ImportError:
        return
    if KdSearch is not None:
        from hydra.core.plugins import Plugins

        Plugins.instance()._register(KdSearch)


def _report_quietly(sweep):
    from .report import report

    try:
        report([sweep])
        print(f"sweep report: {sweep / 'report.md'}", flush=True)
    except Exception as e:  # a report is a convenience: it never fails the sweep
        _fail(f"could not write the sweep report ({e}); try kd report {sweep}")


if __name__ == "__main__":
    sys.exit(main())
