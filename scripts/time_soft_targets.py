"""How much the cached shifted copies save a jittered distillation: the same `kd distill` run with
the teacher once over the transfer set's 25 shifted copies (kd's choice for 25 epochs or more) and
with the teacher on every batch (kd's choice for shorter runs, forced here), alternated.

    python scripts/time_soft_targets.py --teacher pretrained --extra "epochs=25" --repeats 2

Each run is in-process (kd_cli.cli.main) in its own folder under --out; prints wall seconds of the
whole run (the cache is built before training, so train_seconds alone would hide it), the
train_seconds kd records, and the test errors of each.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from kd_cli import cli, stages


def run(folder, teacher, extra, per_batch):
    real = stages.caches_shifts
    if per_batch:
        stages.caches_shifts = lambda epochs, max_shift: False
    start = time.perf_counter()
    try:
        code = cli.main(["distill", f"teacher={teacher}", *extra, f"hydra.run.dir={folder}"])
    except SystemExit as e:
        code = e.code
    finally:
        stages.caches_shifts = real
    if code:
        sys.exit(f"kd distill failed in {folder} (exit {code})")
    wall = time.perf_counter() - start
    m = json.loads((folder / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "train_s": round(m["train_seconds"], 1), "test_errors": m["test_errors"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--extra", default="epochs=25", help="overrides for both runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=f"outputs/time-soft-targets/{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args()
    out, extra = Path(args.out), shlex.split(args.extra)
    rows = []
    for r in range(args.repeats):
        for per_batch in (True, False):  # alternated, so a drift in machine speed hits both
            name = f"{'per_batch' if per_batch else 'cached'}-{r}"
            rows.append({"run": name, **run(out / name, args.teacher, extra, per_batch)})
            print(json.dumps(rows[-1]), flush=True)
    (out / "times.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
