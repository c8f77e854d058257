"""What a run's numbers depend on besides its config: kd's own code, the contents of the data
files, each teacher's file and what precision=auto settled to. The config alone does not pin them
down: the same command trains something else after a `git pull`, with KD_DATA_ROOT pointing
elsewhere, after a teacher file was overwritten, or on a machine without native bfloat16. A run
records them (state.pt, metrics.json); a stopped run resumes, and a sweep continues, only while
they are what they were, so that no run and no sweep mixes two versions of them."""
import hashlib
import json
from pathlib import Path

from .checkpoint import load_checkpoint, sha256_of
from .data import data_sha256
from .errors import KDError

# modules that cannot change what a run computes: the command line and its checks, run folders
# and signals, reports and plots. Every other kd_cli module counts, and so does a new one.
NOT_COMPUTING = {"__init__.py", "cli.py", "config.py", "errors.py", "preflight.py", "job_checks.py", "search_checks.py",
                 "unread.py", "run.py", "stopping.py", "checkpoint.py", "provenance.py", "continuation.py", "jobs.py",
                 "report.py", "plots.py", "sweep_end.py", "search.py"}
_SEEN = {}  # (path, size, mtime) -> sha256: a sweep's jobs share their data and teacher files


def code_sha256():
    """{module: the first 16 hex digits of its sha256} of every kd_cli module that computes."""
    here = Path(__file__).parent
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(here.glob("*.py")) if p.name not in NOT_COMPUTING}


def _stat_key(paths):
    try:
        return tuple((str(p), st.st_size, st.st_mtime_ns) for p in paths for st in [Path(p).stat()])
    except OSError:
        return None


def cached_data_sha256(root, name, training_only=False):
    """data_sha256, each unchanged file hashed once (a sweep's preflight asks for each job, and a
    run's two records share the training files)."""
    return data_sha256(root, name, training_only, file_sha256=_file_sha256)


def trained_on_other_files(metrics, root, name):
    """What differs, as a phrase, where a model's run (its metrics) trained on other files than
    those under root: by its record of the training files where it has one (another test set beside
    them changes no image it trained on), else by that of all four. None without a record, without
    files under root, or where they match."""
    for key, training_only, which in (("train_data_sha256", True, "training files"),
                                      ("data_sha256", False, "files (its run recorded all four files' "
                                                             "sha256 only, so another test set counts)")):
        then = (metrics or {}).get(key)
        if then is not None:
            now = cached_data_sha256(root, name, training_only)
            return which if now is not None and now != then else None
    return None


def _file_sha256(path):
    key = _stat_key([path])
    if key is None:
        raise KDError(f"{path} not found")
    if key not in _SEEN:
        _SEEN[key] = sha256_of(path)
    return _SEEN[key]


def kd_revision():
    """The git commit of the checkout kd runs from (its own, or a larger repository holding kd's
    source), '-dirty' appended where its files differ from it; None for an installed copy, which
    git does not track (site-packages, even in a venv inside another project's repository). A
    record for the reader (which commit's command gave this number): code_sha256 is what resume and
    a sweep's continuation check."""
    import os
    import subprocess

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                 timeout=10, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # never touch .git/index
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None if out.returncode == 0 else None

    if git("ls-files", "--error-unmatch", Path(__file__).name) is None:  # not kd's source in git
        return None
    return git("describe", "--always", "--dirty", "--abbrev=40", "--exclude=*")


def inputs(cfg):
    """What a run records of its code and data (state.pt's and metrics.json's keys)."""
    return {"code_sha256": code_sha256(), "data_sha256": cached_data_sha256(cfg.data.root, cfg.data.name),
            # what a model trained on, to which a teacher and a fitted bias are held (trained_on_other_files)
            "train_data_sha256": cached_data_sha256(cfg.data.root, cfg.data.name, training_only=True),
            "kd_revision": kd_revision()}


def recorded(folder):
    """What a run folder recorded: metrics.json once finished, else its state.pt ({} if neither)."""
    folder = Path(folder)
    found = {}
    if (folder / "metrics.json").is_file():
        try:
            found = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            pass
    elif (folder / "state.pt").is_file():
        found = load_checkpoint(folder / "state.pt")
    return found if isinstance(found, dict) else {}


def _files(entry):
    """[(path, sha256)] of a recorded checkpoint entry (one dict, or a list for an ensemble)."""
    items = entry if isinstance(entry, list) else [entry]
    return [(str(t["path"]), t["sha256"]) for t in items if isinstance(t, dict) and "sha256" in t]


def differences(then, cfg, files=False, precision_now=None):
    """What differs between a run's record `then` and what its config `cfg` gives here now, as
    phrases (none for what the record predates). files: compare the checkpoint files cfg names now
    (teachers, a generalist, kd evaluate's checkpoints: a sweep's jobs still to start take them; a
    resumed run keeps its own, stages.distill). precision_now: what precision=auto settles to here,
    when runs still to start would settle it."""
    found = []
    code = then.get("code_sha256")
    if code is not None:
        now = code_sha256()  # a module gone since: its code moved into another (changed) or computes nothing
        changed = sorted(m for m in now if code.get(m) != now[m])
        if changed:
            found.append(f"kd's code ({', '.join(changed)} changed since)")
    data = then.get("data_sha256")
    if data is not None:
        now = cached_data_sha256(cfg.data.root, cfg.data.name)
        if now is None:
            found.append(f"the data files (no {cfg.data.name} files under data.root={cfg.data.root}: set "
                         "KD_DATA_ROOT to the folder it trained from)")
        elif now != data:
            found.append(f"the data files (the {cfg.data.name} files under data.root={cfg.data.root} are not the "
                         "ones it trained on: KD_DATA_ROOT points elsewhere, or they changed)")
    from .teachers import READS

    for key, resolve, record_key in READS.values() if files else ():
        recorded_files = _files(then.get(record_key))
        if recorded_files and cfg.get(key) is not None:
            try:
                now = [(str(Path(p).resolve()), _file_sha256(p)) for p in resolve(cfg[key])]
            except KDError as e:
                found.append(f"the {key} file ({e}; a relative {key}= is read from the folder kd runs in)")
                continue
            if now != recorded_files:
                gone = [p for p, sha in recorded_files if (p, sha) not in now]
                found.append(f"the {key} file ({', '.join(gone) or 'its list'} changed, or {key}= names other files now)")
    if precision_now is not None and cfg.get("precision") == "auto" and then.get("precision") not in (None, precision_now):
        found.append(f"the precision (auto settled to {then['precision']} there and to {precision_now} here)")
    return found


def _gone_or_changed(then):
    """Phrases for the checkpoint files a record names (a stopped distillation's teachers) that are
    gone or differ from their recorded sha256: a resumed run reads those, not what its command names."""
    from .teachers import READS

    for key, _, record_key in READS.values():
        for path, sha in _files(then.get(record_key)):
            if _stat_key([path]) is None or _file_sha256(path) != sha:
                yield f"the {key} file ({path} is gone or changed since it started)"


def _other_device(then, cfg):
    """A phrase if the device the run's config gives here is of another kind than the one its
    state was saved on (its RNG states hold a CUDA generator's only from a GPU): the rest of the run
    would draw its shuffles, jitter and dropout from another generator, and from a CPU run's state
    a GPU could not restore one."""
    from .prepare import device_named

    if not isinstance(then.get("rng"), dict):
        return []
    ran_on, here = ("cuda" if "cuda" in then["rng"] else "cpu"), device_named(cfg.device).type
    if ran_on == here:
        return []
    # A run begun on a CPU meets a GPU here only under device=auto (with device=cuda it would have
    # begun on one), so hiding the GPU is the way back.
    how = "on a machine with a GPU" if ran_on == "cuda" else "with the GPU hidden (CUDA_VISIBLE_DEVICES= kd ...)"
    return [f"the device (it trained on {ran_on}, and device={cfg.device} gives {here} here: resume it {how})"]


def check_resume(run_dir, cfg):
    """A stopped run resumes only with the code, data, teachers and kind of device it started with."""
    then = recorded(run_dir)
    found = differences(then, cfg) + list(_gone_or_changed(then)) + _other_device(then, cfg)
    if found:
        raise KDError(f"{run_dir} cannot resume with what it started with: {'; '.join(found)}; the rest of the run "
                      "would train with them and mix two versions in one result: restore what changed (the kd "
                      "version it started with, KD_DATA_ROOT, the teacher file), or start a new run (nothing was "
                      "changed)")


def check_sweep_job(folder, cfg, precision_now=None, device_here=True):
    """A sweep continues only while each job it ran would run with the code, data, checkpoint files
    (teachers, a generalist, the checkpoints kd evaluate counts) and settled precision it ran with,
    and a stopped job, resumed here (device_here: not by a cluster launcher, whose nodes settle
    device=auto), on the kind of device it began on."""
    then = recorded(folder)
    found = differences(then, cfg, files=True, precision_now=precision_now) + \
        (_other_device(then, cfg) if device_here else [])
    if found:
        raise KDError(f"sweep job {Path(folder).name} ran with other inputs than this sweep would now: "
                      f"{'; '.join(found)}; continuing would mix two versions in one sweep: restore what "
                      "changed, or choose a new hydra.sweep.dir (nothing was changed)")
