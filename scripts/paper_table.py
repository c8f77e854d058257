"""The paper's MNIST table, measured: teacher, student on hard labels, student distilled.

    python scripts/paper_table.py                    # the default recipes, seeds 0 1 2 for students
    python scripts/paper_table.py --seeds 0 --extra "epochs=1 data.train_limit=2000"   # a smoke run
    python scripts/paper_table.py --teacher outputs/paper-table/run1/teacher-seed0/checkpoint.pt

Runs the installed `kd` (one teacher, then for each student seed: hard labels, distilled with the
default recipe, and distilled in the paper's setup, `recipe=paper`: T=20 on the unjittered
transfer set), each in outputs/paper-table/<stamp>/<row>-seed<k>, and prints a Markdown table: the
paper's number, ours (mean over seeds, and each seed), the time of each run. The table is also
written to table.md and table.json in that folder.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from omegaconf import OmegaConf

PAPER = {"teacher": 67, "student": 146, "distilled": 74, "distilled_paper_setup": 74}


def run(stage, run_dir, overrides):
    cmd = ["kd", stage, *overrides, f"hydra.run.dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return {**json.loads((run_dir / "metrics.json").read_text()),
            "config": OmegaConf.load(run_dir / ".hydra" / "config.yaml")}


def recipe(metrics):
    """How a distilled row was trained, from its own metrics.json (what ran, not what was asked)."""
    jitter = metrics["config"].data.jitter
    jittered = f"jittered +-{jitter} px" if jitter else "unjittered"
    return f"T={metrics['T']:g} alpha={metrics['alpha']:g}, {jittered} transfer set, {metrics['epochs']} epochs"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--distill-extra", default="", help="overrides for the default-recipe distillation row (e.g. T=3)")
    ap.add_argument("--extra", default="", help="overrides added to every stage (e.g. device=cuda)")
    ap.add_argument("--teacher-extra", default="", help="overrides for the teacher only")
    ap.add_argument("--teacher", default=None,
                    help="an existing teacher checkpoint.pt: reuse it instead of training one (its own "
                         "metrics.json gives the teacher row)")
    ap.add_argument("--out", default=None, help="folder for the runs (default outputs/paper-table/<stamp>)")
    args = ap.parse_args()

    out = Path(args.out or f"outputs/paper-table/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    extra = shlex.split(args.extra)
    started = time.time()
    rows = {"teacher": [], "student": [], "distilled": [], "distilled_paper_setup": []}
    if args.teacher:
        teacher_ckpt = Path(args.teacher).resolve()
        rows["teacher"].append(json.loads((teacher_ckpt.parent / "metrics.json").read_text()))  # no config needed
    else:
        rows["teacher"].append(run("train-teacher", out / f"teacher-seed{args.teacher_seed}",
                                   [f"seed={args.teacher_seed}", *extra, *shlex.split(args.teacher_extra)]))
        teacher_ckpt = (out / f"teacher-seed{args.teacher_seed}" / "checkpoint.pt").resolve()
    for seed in args.seeds:
        rows["student"].append(run("train-student", out / f"student-seed{seed}", [f"seed={seed}", *extra]))
        rows["distilled"].append(run("distill", out / f"distilled-seed{seed}",
                                     [f"seed={seed}", f"teacher={teacher_ckpt}", *shlex.split(args.distill_extra),
                                      *extra]))
        rows["distilled_paper_setup"].append(run("distill", out / f"distilled-paper-setup-seed{seed}",
                                                 [f"seed={seed}", "recipe=paper", f"teacher={teacher_ckpt}",
                                                  *extra]))

    mean = {k: statistics.mean(m["test_errors"] for m in v) for k, v in rows.items()}
    gap = mean["student"] - mean["teacher"]
    closed = {k: (mean["student"] - mean[k]) / gap if gap > 0 else float("nan")
              for k in ("distilled", "distilled_paper_setup")}
    names = {"teacher": "teacher 784-1200-1200-10, dropout, max-norm, jitter",
             "student": "student 784-800-800-10, hard labels",
             "distilled": "student 784-800-800-10, distilled, default recipe: " + recipe(rows["distilled"][0]),
             "distilled_paper_setup": "student 784-800-800-10, distilled, paper's setup (`recipe=paper`): "
                                      + recipe(rows["distilled_paper_setup"][0])}
    lines = ["| model | paper | ours (mean) | ours per seed | train s per run | wall s per run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k, v in rows.items():
        seeds = ", ".join(f"{m['test_errors']} (seed {m['seed']})" for m in v)
        lines.append(f"| {names[k]} | {PAPER[k]} | {mean[k]:.1f} | {seeds} | "
                     f"{statistics.mean(m['train_seconds'] for m in v):.0f} | "
                     f"{statistics.mean(m['wall_seconds'] for m in v):.0f} |")
    lines.append("")
    lines.append(f"Test errors out of {rows['teacher'][0]['test_total']}. Distillation closes "
                 f"{100 * closed['distilled']:.0f}% of the student-teacher gap with the default recipe, "
                 f"{100 * closed['distilled_paper_setup']:.0f}% in the paper's setup "
                 f"(paper: {100 * (146 - 74) / (146 - 67):.0f}%). "
                 f"Whole table: {(time.time() - started) / 60:.1f} min wall"
                 f"{' (teacher reused from ' + str(teacher_ckpt) + ', not retrained)' if args.teacher else ''}.")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps({"mean": mean, "gap_closed": closed, "runs": {
        k: [{"test_errors": m["test_errors"], "seed": m["seed"], "train_seconds": m["train_seconds"],
             "wall_seconds": m["wall_seconds"]} for m in v] for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
