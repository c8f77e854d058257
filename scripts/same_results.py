"""Do two sets of runs agree bit for bit? The check behind "no behaviour changes": run the same
command (e.g. scripts/paper_table.py at reduced epochs) before and after a change, then

    python scripts/same_results.py outputs/before outputs/after

compares every run folder (a folder with Hydra's .hydra record, or a metrics.json) by its path
relative to the folder given: for a training run the weights in checkpoint.pt, test_errors and
the per-epoch history (loss and errors); for a kd evaluate run its counts (test errors, per class,
the confusion matrix, the bias shifts' effect). A run in only one of the two, or not finished in
one, is a difference too. Exit code 0 when all agree, 1 otherwise; one line per run either way.
"""
import argparse
import json
import sys
from pathlib import Path

import torch


EVALUATED = ("test_errors", "per_class_errors", "confusion", "bias")  # what kd evaluate counted


def runs(root):
    """{path relative to root: folder} of every run or sweep job under root, finished or not."""
    root = Path(root)
    found = {p.parent for p in root.rglob(".hydra") if p.is_dir()} | {p.parent for p in root.rglob("metrics.json")}
    return {d.relative_to(root): d for d in found}


def compare(a, b):
    """What differs between two run folders ('' when nothing does)."""
    unfinished = [str(d) for d in (a, b) if not (d / "metrics.json").is_file()]
    if unfinished:
        return f"not finished: {', '.join(unfinished)}"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    trained = [(d / "checkpoint.pt").is_file() for d in (a, b)]
    if trained[0] != trained[1]:
        return "a training run in one, not in the other"
    if not trained[0]:  # kd evaluate: no weights of its own, only what it counted
        differ = [k for k in EVALUATED if ma.get(k) != mb.get(k)]
        return f"{', '.join(differ)} differ" if differ else ""
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["state_dict"]
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return "weights differ"
    if ma["test_errors"] != mb["test_errors"]:
        return f"test errors {ma['test_errors']} vs {mb['test_errors']}"
    # history's epoch 0 (the untrained model) exists only in runs made since it was added
    ha, hb = ([h for h in m.get("history", []) if h["epoch"] > 0] for m in (ma, mb))
    return "" if ha == hb else "history differs"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args()
    before, after = runs(args.before), runs(args.after)
    if not before and not after:
        sys.exit(f"no run folder (.hydra or metrics.json) is in {args.before} or {args.after}")
    bad = 0
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            why = f"only in {args.before if name in before else args.after}"
        else:
            why = compare(before[name], after[name])
        bad += bool(why)
        print(f"{'DIFFERENT' if why else 'same':9} {name}{': ' + why if why else ''}")
    total = len(set(before) | set(after))
    print(f"{total - bad} of {total} runs the same")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
