"""bf16 against fp32: the same runs in both precisions over seeds, as `kd` sweeps, then `kd report`
for each and the training time per epoch of each precision.

    KD_DATA_ROOT=../shared/data python scripts/precision_parity.py --out outputs/precision

runs, each a sweep `-m seed=0,1,2 precision=fp32,bf16` into <out>/<row>:
  student   kd train-student                          (the paper's baseline, its 20 epochs)
  teacher   kd train-teacher epochs=20                (a shorter teacher than the 500-epoch default)
  distill   kd distill epochs=20 teacher=<the fp32 seed-0 teacher above, or --teacher>   (the default recipe, shortened)
and prints, per row, kd report's table (test errors over seeds, per precision) and the mean
train_seconds per epoch in bf16 over fp32. Times are only meaningful with nothing else running.
"""
import argparse
import json
import shlex
import statistics
import subprocess
from pathlib import Path

from kd_cli.cli import installed

ROWS = {"student": ("train-student", ""), "teacher": ("train-teacher", "epochs=20"),
        "distill": ("distill", "epochs=20")}


def sweep(stage, folder, overrides, seeds):
    cmd = ["kd", stage, "-m", f"seed={','.join(map(str, seeds))}", "precision=fp32,bf16", *overrides,
           f"hydra.sweep.dir={folder}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(installed(cmd), check=True)


def seconds_per_epoch(folder, precision):
    """Mean train_seconds / epochs of the sweep's finished jobs in that precision."""
    runs = [json.loads(p.read_text()) for p in Path(folder).glob("*/metrics.json")]
    return statistics.mean(m["train_seconds"] / m["epochs"] for m in runs if m["precision"] == precision)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/precision")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--extra", default="", help="overrides added to every run (e.g. data.train_limit=2000)")
    ap.add_argument("--teacher", help="the distill row's teacher (e.g. pretrained); default: the teacher row's "
                                      "fp32 run of the first seed, which must have run into --out")
    args = ap.parse_args()
    out = Path(args.out)
    for row in args.rows:
        stage, own = ROWS[row]
        overrides = [*shlex.split(own), *shlex.split(args.extra)]
        if row == "distill" and args.teacher:
            overrides.append(f"teacher={args.teacher}")
        elif row == "distill":
            def is_fp32_first_seed(path):
                m = json.loads((path.parent / "metrics.json").read_text())
                return m["precision"] == "fp32" and m["seed"] == args.seeds[0]
            teacher = next(p for p in sorted((out / "teacher").glob("*/checkpoint.pt")) if is_fp32_first_seed(p))
            overrides.append(f"teacher={teacher}")
        sweep(stage, out / row, overrides, args.seeds)
        subprocess.run(installed(["kd", "report", str(out / row)]), check=True)
        fp32, bf16 = (seconds_per_epoch(out / row, p) for p in ("fp32", "bf16"))
        print(f"{row}: train s/epoch fp32 {fp32:.2f}, bf16 {bf16:.2f}, bf16/fp32 {bf16 / fp32:.2f}", flush=True)


if __name__ == "__main__":
    main()
