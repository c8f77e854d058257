"""Sweep, search (or run) folders -> one table (report.md, report.csv) and plots: test errors vs T
for a grid, validation errors vs each searched parameter for a search, learning curves for both.

Every job a sweep was launched with is a row (its multirun.yaml says which), and so is every
other folder with a .hydra/ below the given paths. A job is `done` (metrics.json), `failed`
(error.txt; or an ERROR line in its log, where it left no state.pt), `running` (a kd process
holds its lock), `stopped` (a state.pt to resume from), `unfinished` (killed before its first
epoch ended), `not started` (the sweep ended first)
or `unreadable` (its records are damaged: the reason is in the row). No job is dropped.
"""
import csv
import functools
import hashlib
import json
import math
import re
import statistics
from collections import Counter
from itertools import groupby
from pathlib import Path

from omegaconf import OmegaConf

from .config import typed_key
from .errors import KDError
from .plots import SEED, _number, learning_curves, plot, validation_plot
from .run import ERROR, METRICS, RECORD, STATE, in_use, recorded, sweep_jobs
from .run import is_search


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


def _how_it_ran(key):
    """Hydra's own keys, and resume= (how a stopped job went on, not what it trained with)."""
    return key.startswith("hydra") or key == "resume"


def _same(value):
    """A value as compared: T=5 typed and T: 5.0 from a recipe are one value, null and None too."""
    if value is None or value in ("null", "None"):
        return None
    number = _number(value)
    return str(value).replace(" ", "") if number is None else number


def _by_stage(rows):
    """{stage: its rows}, with the rows of no known stage (not started, no record) in each: keys are
    compared within a stage, since a distillation's T and an evaluation's checkpoint are not values
    of one axis. Rows that say no stage at all are one group, under None."""
    stages = {}
    for r in rows:
        stages.setdefault(r["values"].get("stage"), []).append(r)
    unknown = stages.pop(None, [])
    return {stage: group + unknown for stage, group in stages.items()} or {None: unknown}


def swept_keys(rows):
    """The axes: keys whose values differ between jobs of one stage (typed, from a config group, or
    a key one job's config has and another's lacks), and the stage where jobs of several are
    reported together. And the typed overrides that the jobs share, {title: {key: value}}: one
    title, or one per stage where there are several."""
    keys = sorted({k for r in rows for k in r["values"] if not _how_it_ran(k)})
    absent = object()

    def values(k, rows):  # a job with no readable config (not started) says only what was typed, and
        # only a finished one has recorded how it ran (precision=auto settled to fp32, say)
        if k in AS_RUN:
            return {_same(r["values"].get(k, absent)) for r in rows if r["status"] == "done"}
        return {_same(r["values"].get(k, absent)) for r in rows if r.get("configured", True) or k in r["values"]}
    stages = _by_stage(rows)
    swept = [k for k in keys if any(len(values(k, g)) > 1 for g in ([rows] if k == "stage" else stages.values()))]
    fixed = {}
    for stage, group in stages.items():
        shared = {}
        for r in group:
            shared.update({k: v for k, v in r["overrides"].items() if k not in shared})
        shared = {k: shared[k] for k in sorted(shared) if k not in swept and not _how_it_ran(k)}
        if shared:
            fixed["Same in every job" if len(stages) == 1 else f"Same in every {stage} job"] = shared
    return swept, fixed


def seed_groups(rows, swept, unfinished=False):
    """Done jobs grouped by every swept value but the seed: mean, spread (sample std), min, max;
    `rows` the members (their validation errors choose between groups); `launched` how many jobs
    the setting has in all (one that failed, diverged or has not finished counts there, not in the
    statistics). With `unfinished`, also the settings none of whose jobs is done (n 0, no statistics)."""
    others = [k for k in swept if k != SEED]
    key = lambda r: tuple(str(_same(r["values"].get(k))) for k in others)  # noqa: E731
    launched = Counter(map(key, rows))
    done = sorted((r for r in rows if r["status"] == "done"), key=key)
    groups = []
    for k, members in groupby(done, key=key):
        members = list(members)
        errs = [r["test_errors"] for r in members]
        groups.append({"values": {k: members[0]["values"].get(k) for k in others}, "n": len(errs),
                       "launched": launched[k], "mean": statistics.mean(errs),
                       "std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
                       "min": min(errs), "max": max(errs), "rows": members})
    if unfinished:
        seen = {key(r) for r in done}
        for r in rows:
            if key(r) not in seen:
                seen.add(key(r))
                groups.append({"values": {k: r["values"].get(k) for k in others}, "n": 0, "launched": launched[key(r)],
                               "mean": None, "std": None, "min": None, "max": None, "rows": []})
    return groups


def _short(value):
    """A searched float at 4 significant digits for the table (report.csv keeps every digit); an
    integer (a seed of 123456789) as it is."""
    number = _number(value)
    whole = str(value).lstrip("-").isdigit()
    return f"{number:.4g}" if number is not None and not whole and len(str(value)) > 8 else value


def _val_rate(r):
    """Validation errors as a fraction of the split (raw counts where the size is not recorded)."""
    return r["val_errors"] / r["val_size"] if r.get("val_size") else r["val_errors"]


def best_setting(rows, swept):
    """(the group, of seed_groups, whose members' mean validation error rate is lowest: the first
    of equals; the other groups tied with it), or None. A setting is chosen by all its seeds: one
    lucky seed does not choose it, and its test errors are its seeds' mean."""
    order = {id(r): i for i, r in enumerate(rows)}  # job order: the first of equals is the first job's
    scored = []
    for g in sorted(seed_groups(rows, swept), key=lambda g: min(order[id(r)] for r in g["rows"])):
        if g["n"] < g["launched"]:  # a seed that failed or is unfinished: not yet a setting to choose
            continue
        validated = [r for r in g["rows"] if r["val_errors"] is not None]
        if len(validated) == len(g["rows"]):
            scored.append((statistics.mean(map(_val_rate, validated)), g))
    if not scored:
        return None
    low = min(score for score, _ in scored)
    tied = [g for score, g in scored if math.isclose(score, low, rel_tol=1e-12, abs_tol=1e-12)]
    return tied[0], tied[1:]


def markdown(rows, swept, fixed, groups=None, found=None):
    validated = any(r["val_errors"] is not None for r in rows)
    head = ["job", *swept, "status", *(["val errors"] if validated else []), "test errors", "error rate", "wall s",
            "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [Path(r["job"]).name, *(_short(r["values"].get(k, "")) for k in swept), r["status"],
                 *([] if not validated else ["" if r["val_errors"] is None else str(r["val_errors"])]),
                 "" if r["test_errors"] is None else str(r["test_errors"]),
                 "" if r["test_error_rate"] is None else f"{100 * r['test_error_rate']:.2f}%",
                 "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}", r["error"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    for title, shared in fixed.items():
        lines += ["", f"{title}: " + ", ".join(f"`{k}={v}`" for k, v in shared.items())]
    if groups:
        others = [k for k in swept if k != SEED]
        lines += ["", "Over seeds:", "", "| " + " | ".join([*others, "seeds", "mean", "std", "min", "max"]) + " |",
                  "|" + " --- |" * (len(others) + 5)]
        for g in groups:
            stats = ["", "", "", ""] if not g["n"] else [f"{g['mean']:.1f}", f"{g['std']:.1f}", str(g["min"]), str(g["max"])]
            seeds = str(g["n"]) if g["n"] == g["launched"] else f"{g['n']} of {g['launched']}"
            lines.append("| " + " | ".join([*(str(g["values"][k]) for k in others), seeds, *stats]) + " |")
        if any(g["n"] < g["launched"] for g in groups):
            lines += ["", "A setting with fewer seeds done than launched (\"n of m\": the others failed, diverged or "
                      "have not finished) has its statistics over the done ones only, and is no candidate for the "
                      "best by validation."]
    if found is not None:  # best_setting(rows, swept)
        best, tied = found
        setting = lambda g: ", ".join(f"`{k}={_short(v)}`" for k, v in g["values"].items()) or "its settings"  # noqa: E731
        val = statistics.mean(r["val_errors"] for r in best["rows"])
        tie = f" (tied on validation with {'; '.join(setting(g) for g in tied)}: the test set must not break the tie)" \
            if tied else ""
        jobs = ", ".join(Path(r["job"]).name.split("_", 1)[0] for r in best["rows"])
        if best["n"] == 1:
            (run,) = best["rows"]
            lines += ["", f"Best by validation: {jobs} ({setting(best)}), {run['val_errors']} validation errors; its "
                      f"**{run['test_errors']} test errors** are the number to quote (the test set chose nothing){tie}."]
        else:  # runs of one setting: its seeds, or a search's repeated trials
            lines += ["", f"Best by validation: {jobs} ({setting(best)}), {val:.1f} validation errors over its "
                      f"{best['n']} runs; their mean **{best['mean']:.1f} test errors** is the number to quote (the "
                      f"test set chose nothing){tie}."]
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("done", "running", "failed", "stopped", "unfinished", "not started", "unreadable")}
    lines += ["", f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    return "\n".join(lines)


def write_csv(path, rows, swept):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *swept, "status", "val_errors", "test_errors", "test_error_rate", "wall_seconds", "error"])
        for r in rows:
            w.writerow([r["job"], *(r["values"].get(k, "") for k in swept), r["status"], r["val_errors"], r["test_errors"],
                        r["test_error_rate"], r["wall_seconds"], r["error"]])


def report(paths, out=None):
    """Write report.md, report.csv, report.png (test errors against the swept value, when there is
    one) and curves.png (each run's loss and errors per epoch) into `out` (default: the first
    path) and return the Markdown table."""
    rows = rows_of(paths)
    swept, fixed = swept_keys(rows)
    out = Path(out or paths[0])
    if out.exists() and not out.is_dir():
        raise KDError(f"--out {out} is a file; give a folder for report.md, report.csv and the plots")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KDError(f"cannot make the report folder {out}: {e.strerror or e}") from None
    groups = seed_groups(rows, swept, unfinished=True) if SEED in swept else None
    found = best_setting(rows, swept)
    text = markdown(rows, swept, fixed, groups, found)
    if any(is_search_folder(p) for p in paths):
        if validation_plot(out / "search.png", rows, swept, found[0]["rows"][0] if found else None):
            text += "\n\n![validation errors against each searched parameter](search.png)"
    elif plot(out / "report.png", rows, swept):
        text += "\n\n![test errors](report.png)"
    if learning_curves(out / "curves.png", rows, swept):
        text += "\n\n![learning curves](curves.png)"
    (out / "report.md").write_text(text + "\n")
    write_csv(out / "report.csv", rows, swept)
    return text


def main(args, description):
    """`kd report PATH... [--out DIR]`: the table, as printed."""
    import argparse

    ap = argparse.ArgumentParser(prog="kd report", description=description + ". Lists every job: done, failed "
                                 "(with its last error line), stopped (resumable), unfinished, not started or unreadable.")
    ap.add_argument("paths", nargs="+", help="sweep folders (outputs/<stage>-sweep/<stamp>) or run folders")
    ap.add_argument("--out", help="where report.md/.csv/.png go (default: the first path)")
    args = ap.parse_args(args)
    try:
        return report(args.paths, args.out)
    except OSError as e:
        raise KDError(f"could not write the report: {e.strerror or e} ({e.filename}); give a writable --out") from None
