"""Sweep (or run) folders -> one table (report.md, report.csv) and plots (test errors vs T).

Every job a sweep was launched with is a row (its multirun.yaml says which), and so is every
other folder with a .hydra/ below the given paths. A job is `done` (metrics.json), `failed`
(error.txt, or an ERROR line in its log), `stopped` (a state.pt to resume from), `unfinished`
(killed before its first epoch ended, or still running), `not started` (the sweep ended first)
or `unreadable` (its records are damaged: the reason is in the row). No job is dropped.
"""
import csv
import json
import math
import statistics
from itertools import groupby
from pathlib import Path

from omegaconf import OmegaConf

from .errors import KDError
from .plots import SEED, learning_curves, plot
from .run import ERROR, METRICS, RECORD, STATE, sweep_jobs


def launched_jobs(sweep):
    """[(job number, its overrides)] of a sweep launched by Hydra's basic sweeper, in Hydra's own
    order (its job numbers); [] when the sweep left no readable multirun.yaml."""
    try:
        hydra = OmegaConf.load(Path(sweep) / "multirun.yaml").hydra
        if not hydra.sweeper._target_.endswith("BasicSweeper"):
            return []
        return list(enumerate(sweep_jobs(hydra.overrides.task)))
    except Exception:  # no record, or a damaged one: the folders alone tell what ran
        return []


def find_jobs(paths):
    """[(job folder, overrides it was launched with or None)], every launched job included."""
    jobs = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise KDError(f"{p} is not a folder; kd report takes sweep or run folders")
        for h in sorted(p.rglob(RECORD)):
            if h.is_dir():
                jobs.setdefault(h.parent, None)
        for num, overrides in launched_jobs(p):
            found = [j for j in jobs if j.parent == p and j.name.split("_", 1)[0] == str(num)]
            if found:
                jobs[found[0]] = overrides
            else:  # the sweep ended before this job began: its folder was never made
                jobs[p / f"{num}_{','.join(overrides)}"] = overrides
    if not jobs:
        raise KDError(f"no kd runs (folders with .hydra/) under {', '.join(map(str, paths))}")
    return sorted(jobs.items(), key=lambda item: _job_order(item[0]))


def _job_order(path):
    head = path.name.split("_", 1)[0]
    return (str(path.parent), int(head) if head.isdigit() else math.inf, path.name)


def _last_error(job):
    if (job / ERROR).exists():
        lines = (job / ERROR).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "failed (empty error.txt)"
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


def _row(job, overrides, status, error="", metrics=None):
    m = metrics or {}
    return {"job": str(job), "overrides": dict(o.split("=", 1) for o in overrides or [] if "=" in o),
            "status": status, "test_errors": m.get("test_errors"), "test_error_rate": m.get("test_error_rate"),
            "val_errors": m.get("val_errors"), "wall_seconds": m.get("wall_seconds"), "error": error,
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
    error = _last_error(job)
    status = "failed" if error else "stopped" if (job / STATE).exists() else "unfinished"
    return _row(job, overrides, status, error or ("resume with resume=<job>" if status == "stopped" else ""))


def swept_keys(rows):
    """Override keys whose values differ between jobs (the sweep's axes); the rest are fixed."""
    keys = sorted({k for r in rows for k in r["overrides"] if not k.startswith("hydra")})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    fixed = {k: rows[0]["overrides"].get(k) for k in keys if k not in swept}
    return swept, fixed


def seed_groups(rows, swept):
    """Done jobs grouped by every swept value but the seed: mean, spread (sample std), min, max."""
    others = [k for k in swept if k != SEED]
    key = lambda r: tuple(r["overrides"].get(k) for k in others)  # noqa: E731
    done = sorted((r for r in rows if r["status"] == "done"), key=lambda r: tuple(map(str, key(r))))
    groups = []
    for values, members in groupby(done, key=key):
        errs = [r["test_errors"] for r in members]
        groups.append({"values": dict(zip(others, values)), "n": len(errs), "mean": statistics.mean(errs),
                       "std": statistics.stdev(errs) if len(errs) > 1 else 0.0, "min": min(errs), "max": max(errs)})
    return groups


def markdown(rows, swept, fixed, groups=None):
    head = ["job", *swept, "status", "test errors", "error rate", "wall s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [Path(r["job"]).name, *(r["overrides"].get(k, "") for k in swept), r["status"],
                 "" if r["test_errors"] is None else str(r["test_errors"]),
                 "" if r["test_error_rate"] is None else f"{100 * r['test_error_rate']:.2f}%",
                 "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}", r["error"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    if fixed:
        lines += ["", "Same in every job: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items())]
    if groups:
        others = [k for k in swept if k != SEED]
        lines += ["", "Over seeds:", "", "| " + " | ".join([*others, "seeds", "mean", "std", "min", "max"]) + " |",
                  "|" + " --- |" * (len(others) + 5)]
        for g in groups:
            lines.append("| " + " | ".join([*(str(g["values"][k]) for k in others), str(g["n"]), f"{g['mean']:.1f}",
                                            f"{g['std']:.1f}", str(g["min"]), str(g["max"])]) + " |")
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("done", "failed", "stopped", "unfinished", "not started", "unreadable")}
    lines += ["", f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    return "\n".join(lines)


def write_csv(path, rows, swept):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *swept, "status", "test_errors", "test_error_rate", "wall_seconds", "error"])
        for r in rows:
            w.writerow([r["job"], *(r["overrides"].get(k, "") for k in swept), r["status"], r["test_errors"],
                        r["test_error_rate"], r["wall_seconds"], r["error"]])


def report(paths, out=None):
    """Write report.md, report.csv, report.png (test errors against the swept value, when there is
    one) and curves.png (each run's loss and errors per epoch) into `out` (default: the first
    path) and return the Markdown table."""
    rows = [read_job(j, launched) for j, launched in find_jobs(paths)]
    swept, fixed = swept_keys(rows)
    out = Path(out or paths[0])
    if out.exists() and not out.is_dir():
        raise KDError(f"--out {out} is a file; give a folder for report.md, report.csv and the plots")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KDError(f"cannot make the report folder {out}: {e.strerror or e}") from None
    groups = seed_groups(rows, swept) if SEED in swept else None
    text = markdown(rows, swept, fixed, groups)
    if plot(out / "report.png", rows, swept):
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
