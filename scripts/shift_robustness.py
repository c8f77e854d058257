"""Did the student learn what translation does to a digit? Test errors of kd checkpoints on the
MNIST test set moved by every shift of up to --max-shift pixels.

    python scripts/shift_robustness.py pretrained outputs/distill/<stamp>/checkpoint.pt ... [--json out.json]

The paper's teacher trained on images jittered by up to 2 px; its distilled student, on a transfer
set "that does not contain any translations", is said to learn "the knowledge about how to
generalize that is learned from translated training data". Moving the test digits measures that
knowledge directly: a model that has it keeps its errors when a digit moves by 1 or 2 px, one that
has not loses hundreds. For each checkpoint the table gives the errors on the unshifted test set
and, for each ring d = 1 .. max-shift (the shifts with max(|dy|, |dx|) = d: 8 at 1 px, 16 at 2 px,
zeros filling in where the digit moves away, as kd's jitter does), the mean errors over the
ring's shifts and their range.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from kd_cli.checkpoint import resolve_pretrained
from kd_cli.config import MAX_JITTER
from kd_cli.data import every_shift, load_data
from kd_cli.errors import KDError
from kd_cli.evaluate import predict_logits
from kd_cli.teachers import load_model


def errors_by_shift(model, x, y, max_shift, batch_size=10000):
    """{(dy, dx): errors on x moved dy px down and dx px right} for every shift with |dy|, |dx| <=
    max_shift, (0, 0) included (data.every_shift's codes, decoded)."""
    side, errors = 2 * max_shift + 1, {}
    for k, moved in every_shift(x, max_shift):
        errors[max_shift - k // side, max_shift - k % side] = int((predict_logits(model, moved, batch_size).argmax(1) != y).sum())
    return errors


def rings_of(errors):
    """{d: [errors of each shift in ring d]} for d = 0 .. max shift: ring d holds the shifts with
    max(|dy|, |dx|) = d (8 d of them; ring 0 is the unshifted images)."""
    rings = {}
    for (dy, dx), e in sorted(errors.items()):
        rings.setdefault(max(abs(dy), abs(dx)), []).append(e)
    return dict(sorted(rings.items()))


def describe(ckpt):
    """What a checkpoint is, from what it recorded: its stage, its training set's jitter, and for
    a distilled student its T (or its loss, when that is logit matching)."""
    cfg = ckpt.get("config") or {}
    what = ckpt.get("stage", "?")
    if what == "distill":
        what += f" T={float(cfg['T']):g}" if cfg.get("loss", "kd") == "kd" else f" loss={cfg['loss']}"
    return what + f" jitter={(cfg.get('data') or {}).get('jitter', 0)}"


def refuse(message):
    print(f"shift_robustness: error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="kd checkpoint.pt files (or `pretrained`, the teacher kd ships)")
    ap.add_argument("--max-shift", type=int, default=2, help="largest shift in pixels along each axis (default 2)")
    ap.add_argument("--json", help="also write the errors of every shift here")
    args = ap.parse_args()
    if not 1 <= args.max_shift <= MAX_JITTER:  # kd's own bound on data.jitter
        refuse(f"--max-shift is {args.max_shift}; give 1 to {MAX_JITTER}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        refuse(f"--json {args.json}: its folder does not exist; create it or write elsewhere")
    try:  # every checkpoint loaded and measured before anything is printed or written
        _, _, x, y = load_data(os.environ.get("KD_DATA_ROOT", "data"))
        loaded = [(path, *load_model(resolve_pretrained(path), "cpu", "mnist")) for path in args.checkpoints]
        measured = []
        for path, ckpt, model in loaded:
            errors = errors_by_shift(model, x, y, args.max_shift)
            measured.append((path, describe(ckpt), errors, rings_of(errors)))
    except KDError as e:
        refuse(str(e))
    rings = range(1, args.max_shift + 1)
    head = ["checkpoint", "what", "unshifted"] + [f"{d} px: mean (min-max)" for d in rings]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for path, what, _, by_ring in measured:
        cells = [f"{statistics.mean(by_ring[d]):.1f} ({min(by_ring[d])}-{max(by_ring[d])})" for d in rings]
        print(f"| {path} | {what} | {by_ring[0][0]} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{8 * d} at {d} px" for d in rings)
    print(f"\nTest errors out of {y.numel()}; a ring's mean is over its shifts ({counts}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({path: {"what": what, "errors_by_shift": {f"{dy},{dx}": e for (dy, dx), e in errors.items()},
                              "errors_by_ring": by_ring} for path, what, errors, by_ring in measured}, f, indent=1)


if __name__ == "__main__":
    main()
