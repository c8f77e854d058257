"""`kd <stage> [key=value ...]`: argv[1] picks the stage, the rest goes to Hydra."""
import json
import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import config, run
from .errors import KDError

CONFIG_MODULE = "kd_cli.conf"

# stage -> (primary config name, one line for `kd --help`)
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


def _first_values(overrides):
    """The overrides with each sweep (a,b,c) cut to its first value; and each swept key's values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    single, sweeps = [], {}
    for o in parsed:
        if o.is_interval_sweep():  # a search's range: check its two ends
            ends = [o.value().start, o.value().end]
            sweeps[o.key_or_group] = ends
            single.append(f"{o.get_key_element()}={ends[0]}")
        elif o.is_sweep_override():
            values = list(o.sweep_iterator())
            sweeps[o.key_or_group] = values
            single.append(f"{o.get_key_element()}={list(o.sweep_string_iterator())[0]}")
        else:
            single.append(o.input_line)
    return single, sweeps


def _composition_message(stage, e):
    text = " ".join(str(e).split())
    cause = " ".join(str(e.__cause__).split()) if e.__cause__ else ""
    for msg in (text, cause):
        if "not in struct" in msg or "Could not override" in msg or "Could not append" in msg:
            key = msg.split("'")[1] if "'" in msg else msg
            return f"unknown key '{key}' for kd {stage}; `kd {stage} --cfg job` lists the keys"
        if "not in 'SamplerConfig'" in msg or "GridSampler" in msg:
            return f"hparams_search samplers: tpe (the default), random, cmaes; for a grid, kd {stage} -m key=a,b,c"
        if "hydra/sweeper/optuna" in msg or "hydra/sweeper/sampler" in msg:
            return "hparams_search needs Optuna: pip install 'kd-cli[optuna]'"
        if "hparams_search" in msg and "Could not find" in msg:
            names = ", ".join(n for n, _ in STAGES.values() if n in SEARCHABLE)
            return f"no search space for kd {stage} there; hparams_search= one of: {names} (conf/hparams_search/)"
    if "override_grammar" in text:  # a parse error: most often a path or list needing quotes
        text += " (quote a value that holds = , [ or spaces: checkpoint=['a/0_seed=0/checkpoint.pt','b.pt'])"
    return text.split(" full_key:")[0]


PATH_KEYS = ("teacher", "generalist", "checkpoint", "resume", "hydra.run.dir", "hydra.sweep.dir")


def quote_paths(overrides):
    """A sweep job's folder name holds = and , (0_T=2,alpha=0.1), which Hydra's override grammar
    cannot read unquoted: quote a path value that holds '=' so `teacher=<job dir>/checkpoint.pt`
    just works. Lists and already quoted values are left as the user wrote them."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+~") in PATH_KEYS and "=" in value and value[:1] not in "[('\"":
            o = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(o)
    return out


SEARCHABLE = ("train_teacher", "train_student", "distill")  # stages with conf/hparams_search/<name>.yaml


def check_search(stage, cfg, multirun, check_value):
    """A search (hparams_search=...) needs -m and a validation split to minimise, and every end
    of every range it searches must be a value kd accepts."""
    if not multirun:
        raise KDError(f"hparams_search runs a search of many runs: add -m (kd {stage} -m hparams_search=...)")
    if not cfg.data.val_size:
        raise KDError("a search minimises validation errors: set data.val_size (e.g. 10000); "
                      "the test set is never its objective")
    if str(OmegaConf.select(cfg, "hydra.sweeper.sampler._target_", default="")).endswith("GridSampler"):
        raise KDError(f"for a grid, use kd's own sweep: kd {stage} -m key=a,b,c (no hparams_search)")
    space = OmegaConf.to_container(cfg.hydra.sweeper.params or {})
    for key in space:
        if OmegaConf.select(cfg, key, default=None) is None and key not in cfg.hydra.runtime.choices:
            raise KDError(f"the search space has {key}, which kd {stage} does not; "
                          f"use hparams_search={STAGES[stage][0]} or drop hydra.sweeper.params.{key}")
    _, ends = _first_values([f"{k}={v}" for k, v in space.items()])
    for key, values in ends.items():
        check_value(key, values)


def _is_search(cfg):
    return str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")).endswith("KdSearch")


def _is_hydra_key(override):
    return override.lstrip("+~").startswith("hydra")


def check_overrides(stage, config_name, overrides):
    """Compose the stage's config before Hydra runs it and check every value (every value of a
    sweep too), and the folder it will write in: a typo'd key, a bad value or another run's
    folder ends in one line, with no folder made or changed."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    multirun = any(o in ("-m", "--multirun") for o in overrides)
    args = [o for o in overrides if o not in ("-m", "--multirun")]
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            single, sweeps = _first_values(args)
            cfg = compose(config_name, overrides=single, return_hydra_config=True)
            config.check(stage, cfg)

            def check_values(key, values):
                if OmegaConf.select(cfg, key, default=None) is None or key.startswith("hydra"):
                    return  # a config group (model=a,b) or Hydra's own key: composition checked it
                for v in values:
                    trial = cfg.copy()
                    with open_dict(trial):
                        OmegaConf.update(trial, key, v, merge=False)
                    config.check(stage, trial)

            for key, values in sweeps.items():
                check_values(key, values)
            if _is_search(cfg):
                check_search(stage, cfg, multirun, check_values)
            if multirun:
                run.check_writable(cfg.hydra.sweep.dir)
                if cfg.hydra.sweeper._target_.endswith("BasicSweeper"):
                    jobs = run.sweep_jobs(o for o in args if not _is_hydra_key(o))
                    run.check_sweep_continuation(stage, cfg.hydra.sweep.dir, jobs,
                                                 lambda job: OmegaConf.to_container(compose(config_name, overrides=job)))
            else:
                run.check_writable(cfg.hydra.run.dir)
                if not cfg.get("resume"):
                    run.check_new_run_folder(Path(cfg.hydra.run.dir), stage)
    except KDError:
        raise
    except Exception as e:  # Hydra's composition and parse errors have no common base
        raise KDError(_composition_message(stage, e)) from None


def _share_cores(hc):
    """Jobs that run side by side (the joblib launcher's n_jobs) split the cores between them
    instead of each starting one torch thread per core and fighting over them."""
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None) if hc.get("launcher") else None
    if isinstance(n_jobs, int) and n_jobs != 1:
        import torch

        cores = os.cpu_count() or 1
        torch.set_num_threads(1 if n_jobs < 1 else max(1, cores // n_jobs))


def _task(stage):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from . import stages
    from .train import Diverged, Interrupted

    def task(cfg):
        hc = HydraConfig.get()
        _share_cores(hc)
        out, multirun = hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN
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
    try:
        if not inspect_only:
            overrides = run.resume_overrides(stage, overrides)  # reads resume=<dir> as typed
        # Hydra's parser wants -m before the overrides; users put it anywhere (kd distill T=1,2 -m)
        flags = [o for o in overrides if o in ("-m", "--multirun")]
        overrides = [*flags, *quote_paths(o for o in overrides if o not in flags)]
        if not inspect_only:
            check_overrides(stage, config_name, overrides)
    except KDError as e:
        _fail(str(e))
        return 2

    import hydra

    from .report import is_search
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
        if failed and is_search(sweep):  # failures are part of a search: recorded in the study, reported
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
