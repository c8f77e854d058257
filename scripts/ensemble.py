"""An ensemble of teachers that differ only in seed, and the student distilled from all of them:

    python scripts/ensemble.py                         # 3 teachers, the default teacher recipe
    python scripts/ensemble.py --teacher-extra "epochs=60"   # shorter teachers (a 2-core budget)

Runs `kd train-teacher -m seed=0,1,..` (one sweep), `kd evaluate` on all of them (each member, the
arithmetic and the geometric ensemble), then `kd distill` from the whole sweep folder and, for
comparison, from the first teacher alone (same student recipe and seed), into
outputs/ensemble/<stamp>/, and prints a Markdown table (also written to table.md there).
"""
import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

from kd_cli.cli import installed


def kd(*args):
    print("+", shlex.join(["kd", *args]), flush=True)
    subprocess.run(installed(["kd", *args]), check=True)


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--teacher-extra", default="", help="overrides for the teachers (e.g. epochs=60)")
    ap.add_argument("--extra", default="", help="overrides for the students")
    ap.add_argument("--combine", default="arithmetic", choices=["arithmetic", "geometric"])
    ap.add_argument("--out", default=None, help="default outputs/ensemble/<stamp>")
    args = ap.parse_args()
    out = Path(args.out or f"outputs/ensemble/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    started = time.time()
    seeds = ",".join(str(s) for s in range(args.teachers))
    kd("train-teacher", "-m", f"seed={seeds}", *shlex.split(args.teacher_extra), f"hydra.sweep.dir={out / 'teachers'}")
    ckpts = sorted((out / "teachers").glob("*/checkpoint.pt"))
    kd("evaluate", "checkpoint=[" + ",".join(f"'{c}'" for c in ckpts) + "]", f"combine={args.combine}",
       f"hydra.run.dir={out / 'ensemble'}")
    kd("distill", f"teacher={out / 'teachers'}", f"teacher_combine={args.combine}", *shlex.split(args.extra),
       f"hydra.run.dir={out / 'from-ensemble'}")
    kd("distill", f"teacher={ckpts[0]}", *shlex.split(args.extra), f"hydra.run.dir={out / 'from-one'}")

    e, many, one = metrics(out / "ensemble"), metrics(out / "from-ensemble"), metrics(out / "from-one")
    member_errors = ", ".join(str(m["test_errors"]) for m in e["members"])
    lines = ["| model | test errors |", "| --- | --- |",
             f"| {len(ckpts)} teachers (seeds {seeds}), each | {member_errors} |",
             f"| their ensemble, arithmetic mean of probabilities | {e['ensemble_test_errors']['arithmetic']} |",
             f"| their ensemble, geometric mean | {e['ensemble_test_errors']['geometric']} |",
             f"| student distilled from the ensemble ({args.combine}, T={many['T']:g}, alpha={many['alpha']:g}) "
             f"| {many['test_errors']} |",
             f"| student distilled from teacher seed 0 alone | {one['test_errors']} |",
             "", f"Teacher overrides: `{args.teacher_extra or '(defaults)'}`; student overrides: "
                 f"`{args.extra or '(defaults)'}`. Whole run {(time.time() - started) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
