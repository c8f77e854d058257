"""A run folder's life. A folder belongs to one run: a new run starts only in a folder that holds
no run, `resume=` continues only a stopped one, and a run finishes by writing checkpoint.pt and
metrics.json (each whole or not at all) and dropping its resumable state. Whether a stopped run
or an existing sweep may go on is continuation.py's."""
import contextlib
import os
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import save_checkpoint, save_json, write_atomically
from .errors import KDError

STATE = "state.pt"            # the resumable training state, until the run finishes
CHECKPOINT = "checkpoint.pt"  # the finished model
METRICS = "metrics.json"      # the finished run's numbers
ERROR = "error.txt"           # why a run failed, one line (kd report shows it)
RECORD = ".hydra"             # Hydra's record of the run's config and overrides
TEMPORARY = ("state.pt.*.tmp", "checkpoint.pt.*.tmp", "metrics.json.*.tmp")  # a write cut short
LOCK = ".kd.lock"             # locked by the kd process training in the folder (POSIX flock)
LOCK_TRIES = 20               # 1 s of 50-ms tries before a held lock means another run trains there


@contextlib.contextmanager
def hold(folder):
    """An exclusive lock on a run folder while a stage runs in it: a second kd process that would
    train there (resume= typed in two terminals, a sweep continued while it still runs) is refused
    instead of writing the same state.pt. Released when the stage ends or the process dies.
    Without POSIX locks (Windows) nothing is held."""
    try:
        import fcntl

        f = open(Path(folder) / LOCK, "a")
    except (ImportError, OSError):  # no POSIX locks, or a folder the lock file cannot go in
        yield
        return
    with f:
        for attempt in range(LOCK_TRIES):  # in_use() holds it for microseconds: wait those out
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    raise KDError(in_use_message(folder)) from None
                time.sleep(0.05)
            except OSError:  # a filesystem without locks (some network mounts): run unlocked
                break
        yield


def in_use(folder):
    """Whether another process holds the folder's lock now (never ask it of a folder this process
    holds: flock would say yes)."""
    path = Path(folder) / LOCK
    try:
        import fcntl

        with open(path, "r") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except (ImportError, OSError):  # no lock file (never ran since locks came), or no POSIX locks
        return False
    return False


def in_use_message(folder):
    return (f"{folder} is in use: another kd process is training in it now; let it finish, or stop it "
            "(Ctrl-C, kill) and then resume (nothing was changed)")


def check_not_in_use(folder):
    """Before Hydra writes into a run folder: refuse one that another process is training in."""
    if in_use(folder):
        raise KDError(in_use_message(folder))


def state_of(folder):
    """finished | stopped | failed | started (a record, nothing to resume) | empty."""
    folder = Path(folder)
    if (folder / METRICS).exists():  # written last: the run is finished
        return "finished"
    if (folder / STATE).exists():
        return "stopped"
    if (folder / ERROR).exists():
        return "failed"
    if any((folder / name).exists() for name in (RECORD, CHECKPOINT)):
        return "started"
    return "empty"


def check_new_run_folder(folder, stage):
    """Refuse to start a run in a folder that holds one, saying what to do instead."""
    held = state_of(folder)
    if held == "empty":
        return
    what = {"finished": "a finished run (checkpoint.pt)", "stopped": "a stopped run (state.pt)",
            "failed": "a failed run (error.txt)",
            "started": "a run that stopped before its first epoch ended"}[held]
    todo = f"continue it with kd {stage} resume={folder}, or " if held == "stopped" else ""
    raise KDError(f"{folder} already holds {what}; {todo}choose a new hydra.run.dir (nothing was changed)")


def check_resume(run_dir, out_dir=None):
    """A run folder that `resume=` can continue: it has a state.pt and no metrics.json yet, and
    (once Hydra runs) it is this run's own folder. Returns the state's path."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS).exists():
        raise KDError(f"{run_dir} already finished (it has metrics.json); nothing to resume")
    if not (run_dir / STATE).exists():
        why = "it failed: " + (run_dir / ERROR).read_text().strip() if (run_dir / ERROR).exists() else \
            "it stopped before its first epoch ended"
        raise KDError(f"{run_dir} has no {STATE} to resume from ({why}); start a new run instead")
    if out_dir is not None and run_dir.resolve() != Path(out_dir).resolve():
        raise KDError(f"resume={run_dir} must run in that folder; drop hydra.run.dir")
    return run_dir / STATE


def remove_temporaries(folder):
    """Half-written files a killed write left behind (kill -9 between write and rename)."""
    for pattern in TEMPORARY:
        for path in Path(folder).glob(pattern):
            path.unlink(missing_ok=True)


def record_error(folder, message):
    """error.txt, the one line kd report shows for a failed run."""
    try:
        write_atomically(Path(folder) / ERROR, lambda f: f.write((message + "\n").encode()))
    except KDError:
        pass  # the one-line error on the terminal still says what happened


def record_failure(folder, message):
    """A diverged run: error.txt, and no state.pt that invites resuming it into the same NaN."""
    (Path(folder) / STATE).unlink(missing_ok=True)
    record_error(folder, message)


def finish(out_dir, started, stage, model_payload, metrics, earlier_wall_seconds=0.0):
    """Write checkpoint.pt (model, config, metrics), then metrics.json, then drop the resumable
    state: once metrics.json exists the run is finished, and until then it can be resumed (a
    full disk while finishing loses nothing). wall_seconds is this invocation's plus the earlier
    ones' of a resumed run."""
    out_dir = Path(out_dir)
    metrics["wall_seconds"] = round(time.perf_counter() - started + earlier_wall_seconds, 3)
    save_checkpoint(out_dir / CHECKPOINT, {"stage": stage, **model_payload, "metrics": metrics})
    save_json(out_dir / METRICS, metrics)
    (out_dir / STATE).unlink(missing_ok=True)
    return metrics


def recorded_config(job_dir):
    """(overrides, config) a job folder recorded when it started; KDError when unreadable."""
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(Path(job_dir) / RECORD / "overrides.yaml"))
        config = OmegaConf.to_container(OmegaConf.load(Path(job_dir) / RECORD / "config.yaml"))
    except Exception as e:  # OSError, or a YAML/OmegaConf error: they have no common base
        raise KDError(f"{job_dir} has an unreadable {RECORD}/ record ({type(e).__name__}); move that folder "
                      "away") from None
    return overrides, config


def check_writable(folder):
    """Before Hydra makes the run folder: can a file be made where it will go? Probes the nearest
    folder that exists, so nothing is left behind (a stamped run folder does not exist yet)."""
    folder = Path(folder).absolute()
    probe_in = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kd-probe.", dir=probe_in)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise KDError(f"cannot write in {probe_in} ({e.strerror or e}), where the run folder {folder} would "
                      "go; choose a writable hydra.run.dir (or hydra.sweep.dir)") from None


SEARCH_SWEEPER = "hydra_plugins.kd_search.KdSearch"  # hparams_search=...: kd's Optuna sweeper


def is_search(hydra):
    """Whether a (composed or recorded) Hydra config runs kd's search rather than a grid."""
    return OmegaConf.select(hydra, "sweeper._target_", default=None) == SEARCH_SWEEPER


def start(out_dir, resume=None):
    """Before a stage trains in out_dir: remove what a killed write left there, and return the
    state.pt to continue (resume=) or None for a new run, which must find no run's state or
    results in its folder (cli.py checked before Hydra; this holds for any caller)."""
    remove_temporaries(out_dir)
    if resume:
        state = check_resume(resume, out_dir)
        (Path(out_dir) / ERROR).unlink(missing_ok=True)  # why an earlier attempt failed: gone
        return state
    if state_of(out_dir) in ("finished", "stopped"):
        raise KDError(f"{out_dir} already holds a run; continue it with resume= or choose a new hydra.run.dir")
    return None
