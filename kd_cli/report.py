"""Sweep, search (or run) folders -> one table (report.md, report.csv) and plots: test errors vs T
for a grid, validation errors vs each searched parameter for a search, learning curves for both.

Every job a sweep was launched with is a row (its multirun.yaml says which), and so is every
other folder with a .hydra/ below the given paths; jobs.py reads each (done, failed, running,
stopped, unfinished, not started or unreadable). No job is dropped.
"""
import csv
import math
import statistics
from collections import Counter
from itertools import groupby
from pathlib import Path

from .errors import KDError
from .jobs import AS_RUN, is_search_folder, rows_of
from .plots import SEED, _number, learning_curves, plot, validation_plot


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
