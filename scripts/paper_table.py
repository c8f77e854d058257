"""The paper's MNIST table, measured: teacher, student on hard labels, student distilled.

    python scripts/paper_table.py                    # the default recipes, seeds 0 1 2 for students
    python scripts/paper_table.py --seeds 0 --extra "epochs=1 data.train_limit=2000"   # a smoke run
    python scripts/paper_table.py --teacher outputs/paper-table/run1/teacher-seed0/checkpoint.pt
    python scripts/paper_table.py --teacher pretrained   # the students only, from the teacher kd ships
    python scripts/paper_table.py --teacher pretrained --jobs 2   # two runs at a time, half the cores each

Runs the installed `kd`: one teacher (outputs/paper-table/<stamp>/teacher), then one run per seed of
each student row, as a one-job sweep (`kd <stage> -m seed=<s>` into <row>/seed<s>): hard labels
(student/), distilled with the default recipe (distilled/), and distilled in the paper's setup,
`recipe=paper`: T=20 on the unjittered transfer set (distilled-paper-setup/). With --jobs N the
student runs go N at a time, longest first (see in_order), each with cores/N torch threads and its output in
<row>/seed<s>.log: on a 2-core CPU two one-thread runs get more done than one two-thread run (two
cores split a matrix multiply of these shapes poorly). Rerun into the same --out, a stopped or
interrupted table continues: finished runs (the teacher's too) are kept, stopped ones resume. The
rows are kd report's; the script prints one Markdown table: the paper's number, ours (mean over
seeds, and each seed), the time of each run. The table is also written to table.md and table.json
in that folder.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kd_cli.checkpoint import load_checkpoint, resolve_pretrained, teacher_override
from kd_cli.cli import installed, threads_per_job
from kd_cli.errors import KDError
from kd_cli.jobs import rows_of
from kd_cli.report import seed_groups
from kd_cli.preflight import quote_paths, sweep_in
from kd_cli.run import recorded_config, state_of

PAPER = {"teacher": 67, "student": 146, "distilled": 74, "distilled_paper_setup": 74}
# the table reads each run's final errors only: counting them after every 10th epoch instead of
# every epoch saves about 15% of a student's epoch (--extra eval_every=1 keeps the full curves)
EVAL_EVERY = 10


def teacher_run(folder, overrides):
    """(command, log) for the table's own teacher: a new run into folder, or resume= of the one a
    stopped table left there; None once it has finished. One begun with other overrides is refused."""
    state = state_of(folder)
    if state in ("finished", "stopped"):  # kept or continued only as it was begun
        then = [o for o in recorded_config(folder)[0] if not o.startswith("resume=")]
        if then != quote_paths(overrides):
            raise SystemExit(f"paper_table: error: {folder} holds a teacher begun with [{' '.join(then)}], and "
                             f"this call asks for [{' '.join(overrides)}]; give the --teacher-seed, --extra and "
                             "--teacher-extra it was begun with, or a new --out")
    if state == "finished":
        return None
    cmd = ["kd", "train-teacher", f"resume={folder}"] if state == "stopped" else \
        ["kd", "train-teacher", *overrides, f"hydra.run.dir={folder}"]
    return cmd, folder.with_suffix(".log")


def seed_run(stage, folder, seed, overrides):
    """(command, log) of one seed of a row: a one-job sweep into <folder>/seed<s>, so that the same
    command, run again, keeps it if finished and resumes it if stopped."""
    job_dir = Path(folder) / f"seed{seed}"
    return ["kd", stage, "-m", f"seed={seed}", *overrides, f"hydra.sweep.dir={job_dir}"], job_dir.with_suffix(".log")


def run_all(runs, jobs):
    """Run each (command, log), `jobs` at a time in list order; [(command, log, exit code)] of those
    that failed. One at a time a run has the terminal (and every core, or OMP_NUM_THREADS); side by
    side each gets an equal share of the cores as its threads (kd's own rule for the joblib
    launcher) and appends its output to its log, so that progress bars do not interleave. Worker
    threads wait on the runs, so a Ctrl-C reaches each run alone and it stops after saving (a run
    waited on from the main thread would be killed 0.25 s later, by subprocess.run)."""
    side_by_side = min(jobs, len(runs)) > 1
    threads = threads_per_job(min(jobs, len(runs))) if side_by_side else None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if side_by_side else None

    def one(cmd, log):
        print("+", shlex.join(cmd) + (f"  >> {log}" if side_by_side else ""), flush=True)
        if not side_by_side:
            code = subprocess.run(installed(cmd), check=False).returncode
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
                f.flush()
                code = subprocess.run(installed(cmd), check=False, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            print(f"{'done' if code == 0 else f'failed (exit {code}), see {log}'}: {shlex.join(cmd)}", flush=True)
        return code

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda run: one(*run), runs))
    return [(cmd, log, code) for (cmd, log), code in zip(runs, codes) if code]


def in_order(runs, jobs):
    """The student runs, longest first (the default recipe's 120 epochs of distillation, then the two
    20-epoch rows), so that with --jobs the short runs fill in at the end; but the default recipe's
    first seed runs the teacher over the 25 shifted copies of the transfer set and keeps its logits
    for the other seeds (kd's teacher_cache), which wait for them: while it does, the other
    jobs - 1 runs at hand are hard-label students, which need no teacher."""
    student, first = runs["student"], runs["distilled"][:1]
    return [*first, *student[:jobs - 1], *runs["distilled"][1:], *runs["distilled_paper_setup"], *student[jobs - 1:]]


def refuse_failed(failed):
    if failed:
        raise SystemExit("paper_table: error: runs that did not finish (the reason is at the end of each one's "
                         "output; fix it, or rerun the same command if it was stopped):\n  "
                         + "\n  ".join(f"{shlex.join(cmd)}  (exit {code}; log {log})" for cmd, log, code in failed))


def teacher_row(ckpt):
    """The teacher's row: the metrics its checkpoint carries (the file the students learn from; its
    run folder's metrics.json may belong to another file, and the shipped teacher has no folder)."""
    m = load_checkpoint(ckpt)["metrics"]
    return {"job": str(ckpt), "status": "done", "values": {"seed": str(m["seed"])},
            **{k: m[k] for k in ("test_errors", "test_total", "train_seconds", "wall_seconds")}}


def recipe(row):
    """How a distilled row was trained, from its own config (what ran, not what was asked)."""
    v = row["values"]
    jittered = f"jittered +-{v['data.jitter']} px" if v["data.jitter"] != "0" else "unjittered"
    return f"T={float(v['T']):g} alpha={float(v['alpha']):g}, {jittered} transfer set, {v['epochs']} epochs"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--distill-extra", default="", help="overrides for the default-recipe distillation row (e.g. T=3)")
    ap.add_argument("--extra", default="", help="overrides added to every stage (e.g. device=cuda)")
    ap.add_argument("--teacher-extra", default="", help="overrides for the teacher only")
    ap.add_argument("--teacher", default=None,
                    help="an existing teacher checkpoint.pt, or `pretrained` (the teacher kd ships): reuse "
                         "it instead of training one (its own metrics give the teacher row)")
    ap.add_argument("--out", default=None, help="folder for the runs (default outputs/paper-table/<stamp>)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="student runs side by side, each with cores/jobs threads (default 1: one at a time, "
                         "with every core or OMP_NUM_THREADS); results repeat bit for bit only at the same "
                         "number of threads")
    args = ap.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"paper_table: error: --jobs is {args.jobs}; give 1 or more")
    for flag in ("extra", "distill_extra", "teacher_extra"):  # a row is the seeds of one setting
        swept = sweep_in(shlex.split(getattr(args, flag)))
        if swept:
            raise SystemExit(f"paper_table: error: --{flag.replace('_', '-')} {swept} is a sweep, and each row "
                             "averages one setting over its seeds; give one value per call (another --out), or "
                             "sweep with kd -m and compare with kd report")

    out = Path(args.out or f"outputs/paper-table/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    extra = shlex.split(args.extra)
    # the table's eval_every first: one typed in any --*extra comes later and wins (Hydra: the last value)
    table = [f"eval_every={EVAL_EVERY}"]
    seeds = list(dict.fromkeys(args.seeds))  # a seed given twice would run twice into one folder
    started = time.time()
    if args.teacher:
        try:
            teacher_ckpt = Path(resolve_pretrained(args.teacher)).resolve()
        except KDError as e:
            raise SystemExit(f"paper_table: error: {e}")
    else:
        teacher_ckpt = out / "teacher" / "checkpoint.pt"
    teacher = f"teacher={teacher_override(args.teacher or teacher_ckpt)}"
    rows_to_run = {"distilled": ("distill", out / "distilled", [*table, teacher, *shlex.split(args.distill_extra), *extra]),
                   "distilled_paper_setup": ("distill", out / "distilled-paper-setup", [*table, "recipe=paper", teacher, *extra]),
                   "student": ("train-student", out / "student", [*table, *extra])}
    try:
        if not args.teacher:
            own = teacher_run(teacher_ckpt.parent, [f"seed={args.teacher_seed}", *table, *extra,
                                                    *shlex.split(args.teacher_extra)])
            refuse_failed(run_all([own], 1) if own else [])
        refuse_failed(run_all(in_order({k: [seed_run(stage, folder, seed, overrides) for seed in seeds]
                                        for k, (stage, folder, overrides) in rows_to_run.items()}, args.jobs),
                              args.jobs))
    except KeyboardInterrupt:
        print("paper_table: interrupted (each run stops after saving its state); run the same command "
              "again to continue", file=sys.stderr)
        raise SystemExit(130) from None
    # only the seeds asked for, in their order (an earlier call into this --out may have run others)
    rows = {"teacher": [teacher_row(teacher_ckpt)],
            **{k: [r for seed in seeds for r in rows_of([rows_to_run[k][1] / f"seed{seed}"])]
               for k in ("student", "distilled", "distilled_paper_setup")}}
    unfinished = [r["job"] for v in rows.values() for r in v if r["status"] != "done"]
    if unfinished:
        raise SystemExit(f"runs that did not finish: {', '.join(unfinished)}")
    mean = {k: seed_groups(v, ["seed"])[0]["mean"] for k, v in rows.items()}
    gap = mean["student"] - mean["teacher"]
    # no gap (a smoke run's teacher as bad as its student): nothing to close, and no NaN in table.json
    closed = {k: (mean["student"] - mean[k]) / gap if gap > 0 else None for k in ("distilled", "distilled_paper_setup")}
    names = {"teacher": "teacher 784-1200-1200-10, dropout, max-norm, jitter",
             "student": "student 784-800-800-10, hard labels",
             "distilled": "student 784-800-800-10, distilled, default recipe: " + recipe(rows["distilled"][0]),
             "distilled_paper_setup": "student 784-800-800-10, distilled, paper's setup (`recipe=paper`): "
                                      + recipe(rows["distilled_paper_setup"][0])}
    lines = ["| model | paper | ours (mean) | ours per seed | train s per run | wall s per run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k, v in rows.items():
        seeds = ", ".join(f"{r['test_errors']} (seed {r['values']['seed']})" for r in v)
        lines.append(f"| {names[k]} | {PAPER[k]} | {mean[k]:.1f} | {seeds} | "
                     f"{sum(r['train_seconds'] for r in v) / len(v):.0f} | "
                     f"{sum(r['wall_seconds'] for r in v) / len(v):.0f} |")
    lines.append("")
    paper_closed = f"(paper: {100 * (146 - 74) / (146 - 67):.0f}%)"
    if gap > 0:
        verdict = (f"Distillation closes {100 * closed['distilled']:.0f}% of the student-teacher gap with the "
                   f"default recipe, {100 * closed['distilled_paper_setup']:.0f}% in the paper's setup {paper_closed}.")
    else:
        verdict = f"The hard-label student has no more errors than the teacher: no gap to close {paper_closed}."
    lines.append(f"Test errors out of {rows['teacher'][0]['test_total']}. {verdict} "
                 f"This call: {(time.time() - started) / 60:.1f} min wall"
                 f"{f', {args.jobs} student runs at a time' if args.jobs > 1 else ''}"
                 f"{' (teacher reused from ' + str(teacher_ckpt) + ', not retrained)' if args.teacher else ''}.")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps({"mean": mean, "gap_closed": closed, "runs": {
        k: [{"job": r["job"], "test_errors": r["test_errors"], "seed": int(r["values"]["seed"]),
             "train_seconds": r["train_seconds"], "wall_seconds": r["wall_seconds"]} for r in v]
        for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
