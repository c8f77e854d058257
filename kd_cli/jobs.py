"""A sweep, search or run folder's jobs, each read into one row for kd report: what it ran with
(its config, the overrides typed, and what it recorded of how it ran) and how it ended.

A job is `done` (metrics.json), `failed` (error.txt; or an ERROR line in its log, where it left no
state.pt), `running` (a kd process holds its lock), `stopped` (a state.pt to resume from),
`unfinished` (killed before its first epoch ended), `not started` (the sweep ended first) or
`unreadable` (its records are damaged: the reason is in the row). No job is dropped.
"""
import functools
import hashlib
import json
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from .config import typed_key
from .continuation import recorded, sweep_jobs
from .errors import KDError
from .run import ERROR, METRICS, RECORD, STATE, in_use, is_search


def launched_jobs(sweep):
    """[(job number, its overrides)] of a sweep launched by Hydra's basic sweeper, in Hydra's own
    order (its job numbers); [] when the sweep left no readable multirun.yaml."""
    try:
        hydra = OmegaConf.load(Path(sweep) / "multirun.yaml").hydra
        if not hydra.sweeper._target_.endswith("BasicSweeper"):
            return []
        return list(enumerate(sweep_jobs(recorded(hydra.overrides.task))))
    except Exception:  # no record, or a damaged one: the folders alone tell what ran
        return []


def is_search_folder(sweep):
    """Whether a folder holds a search (hparams_search=...: kd's Optuna sweeper) rather than a grid."""
    try:
        return is_search(OmegaConf.load(Path(sweep) / "multirun.yaml").hydra)
    except Exception:  # no record, or a damaged one: not a search kd can tell
        return False


def _job_num(job):
    """A sweep job's number: the head of kd's folder name (<num>_<overrides>), else what Hydra
    recorded (a custom hydra.sweep.subdir names folders otherwise); None when neither says."""
    head = job.name.split("_", 1)[0]
    if head.isdigit():
        return int(head)
    try:
        return int(OmegaConf.load(job / RECORD / "hydra.yaml").hydra.job.num)
    except Exception:  # a single run (no job number), or a damaged record
        return None


def _excluded_keys(sweep):
    """The keys a sweep leaves out of its job folders' names (paths: a slash would nest folders)."""
    try:
        return set(OmegaConf.load(Path(sweep) / "multirun.yaml").hydra.job.config.override_dirname.exclude_keys)
    except Exception:  # a damaged record: leave nothing out but what cannot be in a name
        return set()


def _dirname(excluded, overrides):
    """The overrides part of the folder name Hydra would have given a job: sorted, without the
    `excluded` keys."""
    return ",".join(sorted(o for o in overrides if typed_key(o) not in excluded)).replace("/", "_")


def _sweep_of(job, sweeps):
    """The nearest folder above a job that holds a sweep's multirun.yaml, or None."""
    return next((parent for parent in job.parents if parent in sweeps), None)


def find_jobs(paths):
    """[(job folder, overrides it was launched with or None)], every launched job included: of
    every sweep under the given folders (a folder of several sweeps too)."""
    jobs = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise KDError(f"{p} is not a folder; kd report takes sweep or run folders")
        for h in sorted(p.rglob(RECORD)):
            if h.is_dir():
                jobs.setdefault(h.parent, None)
        sweeps = {m.parent for m in p.rglob("multirun.yaml")}
        for sweep in sorted(sweeps):
            mine = {_job_num(j): j for j in jobs if _sweep_of(j, sweeps) == sweep}
            excluded = None
            for num, overrides in launched_jobs(sweep):
                if num in mine:
                    jobs[mine[num]] = overrides
                else:  # the sweep ended before this job began: its folder was never made
                    excluded = _excluded_keys(sweep) if excluded is None else excluded
                    jobs[sweep / f"{num}_{_dirname(excluded, overrides)}"] = overrides
    if not jobs:
        raise KDError(f"no kd runs (folders with .hydra/) under {', '.join(map(str, paths))}")
    return sorted(jobs.items(), key=lambda item: _job_order(item[0]))


def _job_order(path):
    head = path.name.split("_", 1)[0]
    return (str(path.parent), int(head) if head.isdigit() else math.inf, path.name)


def _recorded_error(job):
    """The last line of error.txt (kd writes it when a run fails, and removes it when it runs again)."""
    if (job / ERROR).exists():
        lines = (job / ERROR).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "failed (empty error.txt)"
    return None


def _logged_error(job):
    """An ERROR line of the job's log: where error.txt could not be written. The log keeps every
    attempt's lines, so it says failed only of a job that left nothing to resume."""
    for log in job.glob("*.log"):
        errors = [line for line in log.read_text(errors="replace").splitlines() if "ERROR" in line]
        if errors:
            return errors[-1].split("ERROR", 1)[1].strip(" -]")
    return None


def _overrides_of(job):
    overrides = OmegaConf.to_container(OmegaConf.load(job / RECORD / "overrides.yaml"))
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError("not a list of key=value")
    return overrides


def _flat(tree, prefix=""):
    """A composed config as {dotted key: value as text}, lists and all: what a job ran with."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v).replace(" ", "")
    return out


def _config_of(job):
    """The job's composed config (.hydra/config.yaml), flattened; {} when it has none readable."""
    try:
        tree = OmegaConf.to_container(OmegaConf.load(Path(job) / RECORD / "config.yaml"))
        return _flat(tree) if isinstance(tree, dict) else {}
    except Exception:  # a missing or damaged record: the overrides alone describe the job
        return {}


def rows_of(paths):
    """kd report's rows: one per job found under the given sweep or run folders, in job order."""
    return [read_job(job, launched) for job, launched in find_jobs(paths)]


# what a finished run records of how it ran that its config does not say: the stage, what
# precision=auto settled to, the data files' sha256, the CPU threads (float rounding moves with
# them), the sha256 of the teacher, generalist or evaluated checkpoints (a path names whatever file
# is there now) and of kd's computing code; jobs that differ in any of these are not seeds of one
# setting
AS_RUN = ("stage", "precision", "data_sha256", "threads", "teacher_sha256", "checkpoint_sha256", "code_sha256")
FILES_OF = {"teacher_sha256": "teacher", "checkpoint_sha256": "checkpoint_files"}  # where metrics.json keeps them


def _short_sha256(m, key):
    """The first 12 hex digits of what a run recorded under `key`: a file's sha256, a teacher's or
    checkpoints' (one each, joined for an ensemble), the code's (of every module's)."""
    if key == "code_sha256":
        return hashlib.sha256(json.dumps(m["code_sha256"], sort_keys=True).encode()).hexdigest()[:12]
    if key in FILES_OF:
        entry = m[FILES_OF[key]]
        return ",".join(str(f.get("sha256"))[:12] for f in (entry if isinstance(entry, list) else [entry])
                        if isinstance(f, dict))
    return str(m[key])[:12]


@functools.lru_cache(maxsize=64)
def _job_name(record, mtime_ns, size):
    """hydra.job.name in a Hydra record (hydra.yaml, multirun.yaml), read once while the file is
    unchanged: a sweep's not-started jobs all ask its multirun.yaml (13 ms a read)."""
    return str(OmegaConf.load(record).hydra.job.name)


def _as_run(job, m):
    found = {k: _short_sha256(m, k) if k.endswith("sha256") else str(m[k]) for k in AS_RUN
             if m.get(FILES_OF.get(k, k)) is not None}
    # not finished: the stage is the job name Hydra recorded for the job, or (not started) for its sweep
    for record in (Path(job) / RECORD / "hydra.yaml", Path(job).parent / "multirun.yaml"):
        if "stage" not in found and record.is_file():
            try:
                stat = record.stat()
                found["stage"] = _job_name(record, stat.st_mtime_ns, stat.st_size)
            except Exception:  # a damaged record: the stage is not known from it
                pass
    return found


HYDRA_ESCAPED = re.compile(r"\\([\\()\[\]{}:=, \t])")  # a sweep's job records `${x}` as `$\{x\}`


def _row(job, overrides, status, error="", metrics=None):
    m = metrics or {}
    config = _config_of(job)
    # a typed map (bias_shift={3:3.5}) is in the config as its dotted keys (bias_shift.3): one column;
    # a value as the user typed it, not as Hydra's sweeper escaped it for the job's record
    typed = {k: HYDRA_ESCAPED.sub(r"\1", v) for k, v in (o.split("=", 1) for o in overrides or [] if "=" in o)
             if not (v.startswith("{") and any(c.startswith(f"{k}.") for c in config))}
    return {"job": str(job), "overrides": typed, "configured": bool(config),
            # what the job ran with: its config (so T=20 from a recipe counts like a typed T=20),
            # the typed overrides on top (config groups such as recipe=paper live only there), and
            # what it recorded of how it ran
            "values": {**config, **typed, **_as_run(job, m)},
            "status": status, "test_errors": m.get("test_errors"), "test_error_rate": m.get("test_error_rate"),
            "val_errors": m.get("val_errors"), "val_size": m.get("val_size"), "wall_seconds": m.get("wall_seconds"),
            "train_seconds": m.get("train_seconds"), "test_total": m.get("test_total"), "error": error,
            "history": m.get("history") or []}


def read_job(job, launched_with=None):
    """One row of the table; a damaged job folder is a row that says what is wrong, never an error."""
    job = Path(job)
    if not (job / RECORD).is_dir():
        return _row(job, launched_with, "not started", "the sweep ended before this job began")
    try:
        overrides = _overrides_of(job)
    except Exception as e:  # OmegaConf and YAML errors have no common base
        return _row(job, launched_with, "unreadable", f"{RECORD}/overrides.yaml: {type(e).__name__}")
    if (job / METRICS).exists():
        try:
            m = json.loads((job / METRICS).read_text())
            if not isinstance(m.get("test_errors"), int) or not isinstance(m.get("test_error_rate"), float):
                raise ValueError("no test_errors")
        except (ValueError, OSError, AttributeError) as e:
            return _row(job, overrides, "unreadable", f"{METRICS}: {type(e).__name__}: {e}"[:200])
        return _row(job, overrides, "done", metrics=m)
    if in_use(job):  # its state.pt (if any) is the last epoch's, and it is still training
        return _row(job, overrides, "running", "a kd process is training in it now")
    stopped = (job / STATE).exists()
    error = _recorded_error(job) or (None if stopped else _logged_error(job))
    status = "failed" if error else "stopped" if stopped else "unfinished"
    # a sweep's job continues with its sweep (resumed alone, it would record resume= as its own)
    again = f"continue with resume={job.parent}" if (job.parent / "multirun.yaml").is_file() else f"resume with resume={job}"
    return _row(job, overrides, status, error or (again if status == "stopped" else ""))
