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

import torch

from kd_cli.checkpoint import resolve_pretrained
from kd_cli.data import load_mnist, shift_images
from kd_cli.errors import KDError
from kd_cli.evaluate import predict_logits
from kd_cli.teachers import load_model


def errors_by_ring(model, x, y, max_shift, batch_size=10000):
    """{d: [errors on x moved by each shift of ring d]} for d = 0 .. max_shift, ring 0 being the
    unshifted images: a shift code k (data.draw_shifts) moves by (k // side - max_shift, k % side -
    max_shift) pixels, and its ring is the larger of the two."""
    side = 2 * max_shift + 1
    rings = {d: [] for d in range(max_shift + 1)}
    codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for k in range(side * side):
        dy, dx = divmod(k, side)
        ring = max(abs(dy - max_shift), abs(dx - max_shift))
        moved = shift_images(x, codes.fill_(k), max_shift)
        rings[ring].append(int((predict_logits(model, moved, batch_size).argmax(1) != y).sum()))
    return rings


def describe(ckpt):
    """What a checkpoint is, from what it recorded: its stage, and for a student its T and jitter."""
    cfg = ckpt.get("config") or {}
    what = ckpt.get("stage", "?")
    if what == "distill":
        T = f"{float(cfg['T']):g}" if cfg.get("loss", "kd") == "kd" else "logit_mse"
        what += f" T={T} jitter={(cfg.get('data') or {}).get('jitter', 0)}"
    return what


def refuse(message):
    print(f"shift_robustness: error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="kd checkpoint.pt files (or `pretrained`, the teacher kd ships)")
    ap.add_argument("--max-shift", type=int, default=2, help="largest shift in pixels along each axis (default 2)")
    ap.add_argument("--json", help="also write the errors of every shift here")
    args = ap.parse_args()
    if args.max_shift < 1:
        refuse(f"--max-shift is {args.max_shift}; give 1 or more")
    try:  # every checkpoint is checked before any is measured
        _, _, x, y = load_mnist(os.environ.get("KD_DATA_ROOT", "data"))
        loaded = [(path, *load_model(resolve_pretrained(path), "cpu", "mnist")) for path in args.checkpoints]
    except KDError as e:
        refuse(str(e))
    head = ["checkpoint", "what", "unshifted"] + [f"{d} px: mean (min-max)" for d in range(1, args.max_shift + 1)]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    results = {}
    for path, ckpt, model in loaded:
        rings = errors_by_ring(model, x, y, args.max_shift)
        results[path] = {"what": describe(ckpt), "errors_by_ring": rings}
        cells = [f"{statistics.mean(e):.1f} ({min(e)}-{max(e)})" for d, e in rings.items() if d > 0]
        print(f"| {path} | {describe(ckpt)} | {rings[0][0]} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nTest errors out of {y.numel()}; a ring's mean is over its shifts (8 at 1 px, 16 at 2 px).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
