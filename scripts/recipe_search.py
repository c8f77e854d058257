"""Recipe search: run `kd <stage>` once per trial with a held-out validation split, and log the
validation errors (what we choose by), the test errors and the time of each.

    python scripts/recipe_search.py train-teacher lr01 "lr=0.1 epochs=20" lr03 "lr=0.3 epochs=20"

Each trial adds data.val_size=10000 (the choice is made on those 10,000 training images, never on the
test set), runs in outputs/search/<stage>/<name>, and appends a JSON line to
outputs/search/results.jsonl. The table of every trial so far is printed at the end.
"""
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path("outputs/search")


def run_trial(stage, name, overrides):
    run_dir = ROOT / stage / name
    cmd = ["kd", stage, *shlex.split(overrides), "data.val_size=10000", f"hydra.run.dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stderr=subprocess.DEVNULL)
    if proc.returncode != 0:
        return {"stage": stage, "name": name, "overrides": overrides, "failed": proc.returncode}
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"stage": stage, "name": name, "overrides": overrides, "val_errors": m["val_errors"],
            "test_errors": m["test_errors"], "train_seconds": m["train_seconds"],
            "min_val_errors": min(h["val_errors"] for h in m["history"])}


def table(rows):
    out = ["| stage | trial | overrides | val errors /10000 | test errors | train s |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['stage']} | {r['name']} | `{r['overrides']}` | {r.get('val_errors', 'failed')} "
                   f"| {r.get('test_errors', '')} | {r.get('train_seconds', 0):.0f} |")
    return "\n".join(out)


def main(argv):
    stage, pairs = argv[0], argv[1:]
    ROOT.mkdir(parents=True, exist_ok=True)
    for name, overrides in zip(pairs[::2], pairs[1::2]):
        row = run_trial(stage, name, overrides)
        with open(ROOT / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [json.loads(l) for l in open(ROOT / "results.jsonl")]
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
