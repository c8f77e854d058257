"""Do two sets of runs agree bit for bit? The check behind "no behaviour changes": run the same
command (e.g. scripts/paper_table.py at reduced epochs) before and after a change, then

    python scripts/same_results.py outputs/before outputs/after

compares every run folder present in both (by its path relative to the folder given): the
weights in checkpoint.pt, test_errors, and the per-epoch history (loss and errors). Exit code 0
when all agree, 1 otherwise; one line per run either way.
"""
import argparse
import json
import sys
from pathlib import Path

import torch


def runs(root):
    return {p.parent.relative_to(root): p.parent for p in Path(root).rglob("metrics.json")
            if (p.parent / "checkpoint.pt").exists()}


def compare(a, b):
    """What differs between two run folders ('' when nothing does)."""
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["state_dict"]
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return "weights differ"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
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
    common = sorted(set(before) & set(after))
    if not common:
        sys.exit(f"no run folder (checkpoint.pt + metrics.json) is in both {args.before} and {args.after}")
    bad = 0
    for name in common:
        why = compare(before[name], after[name])
        bad += bool(why)
        print(f"{'DIFFERENT' if why else 'same':9} {name}{': ' + why if why else ''}")
    print(f"{len(common) - bad} of {len(common)} runs the same")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
