"""The paper's distillation setup, written out plainly, to try students kd has no knob for.

    KD_DATA_ROOT=../shared/data python scripts/paper_setup_variants.py --seed 0 --opt adam --lr 1e-3

`kd distill recipe=paper` (784-800-800-10, T=20, alpha=0.1, unjittered transfer set, 20 epochs,
SGD with Nesterov momentum 0.9, peak lr 0.05 after a 2-epoch warm-up, then cosine) trained on
50,000 images, 10,000 held out (kd's `data.val_size=10000` split), re-implemented in one loop
with kd's data reader, split, teacher checkpoint and loss, but not kd's training loop, so that a
variant is one flag: another optimizer (`--opt adam`), the student's initial weights scaled
(`--init`), a max-norm constraint that also caps the output units (`--max-norm`, `--max-norm-out`:
what lets Hinton et al. 2012 train at high lr's), a teacher sampled with its dropout on for each batch (`--teacher-dropout`) or averaged
over many such samples (`--teacher-mc`: the dropout ensemble's mean probabilities), momentum,
batch, lr. Its batches are drawn otherwise than kd's, so its runs are other draws of the same
recipe, not kd's runs bit for bit. It prints validation errors (for choosing) and test errors (for
reference), and appends a JSON line per run to --json.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from kd_cli.checkpoint import resolve_pretrained
from kd_cli.data import load_data, split_validation
from kd_cli.evaluate import count_errors, predict_logits
from kd_cli.losses import distillation_loss, soft_targets
from kd_cli.models import MLP, apply_max_norm_
from kd_cli.teachers import combine_log_probs, load_teacher, shifted_logits
from kd_cli.train import Recipe


@torch.no_grad()
def dropout_mean_log_probs(teacher, x, T, samples):
    """log of the mean over `samples` dropout draws of the teacher's probabilities at T (a mask per
    image and draw, as in its training): the dropout ensemble's prediction, where eval mode gives
    its mean network's."""
    teacher.train()
    try:
        return combine_log_probs((soft_targets(torch.cat([teacher(c) for c in x.split(10000)]), T)
                                  for _ in range(samples)), "arithmetic")
    finally:
        teacher.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="pretrained", help="a teacher checkpoint.pt, or pretrained (kd's shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, nargs="+", default=[800, 800], help="the student's hidden widths")
    ap.add_argument("--val-size", type=int, default=10000, help="training images held out for validation")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05, help="peak lr (recipe=paper's 0.05)")
    ap.add_argument("--warmup", type=float, default=2, help="epochs of linear warm-up before the cosine")
    ap.add_argument("--opt", choices=["sgd", "adam"], default="sgd", help="sgd: Nesterov momentum, as kd; adam: AdamW")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--T", type=float, default=20.0)
    ap.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label term")
    ap.add_argument("--init", type=float, default=1.0, help="scale the student's initial weights and biases by this")
    ap.add_argument("--max-norm", type=float, default=None,
                    help="after each step, cap each hidden unit's incoming weight vector at this length (kd's model.max_norm)")
    ap.add_argument("--max-norm-out", action="store_true",
                    help="cap the output units' incoming weights at --max-norm too (kd caps hidden units only)")
    ap.add_argument("--teacher-dropout", action="store_true",
                    help="soft targets from the teacher in training mode (its dropout on), drawn anew for each batch")
    ap.add_argument("--teacher-mc", type=int, default=0,
                    help="soft targets from the mean of the teacher's probabilities at T over this many dropout "
                         "samples (its dropout on), drawn once: the dropout ensemble it was trained as, instead "
                         "of its mean network")
    ap.add_argument("--teacher-shifts", type=int, default=0,
                    help="soft targets for each image from the teacher's outputs on it moved by every shift of up to "
                         "this many pixels (arithmetic mean of the probabilities at T); the student still sees it unmoved")
    ap.add_argument("--bf16", action="store_true", help="the student's forward under bfloat16 autocast, as kd's precision=bf16")
    ap.add_argument("--json", default=None, help="append the run's settings and errors to this file, a JSON line")
    args = ap.parse_args()
    if args.teacher_mc < 0:
        ap.error("--teacher-mc takes a number of dropout samples >= 1 (0: the mean network)")
    if args.max_norm is not None and args.max_norm <= 0:
        ap.error("--max-norm takes a length > 0")
    if args.max_norm_out and args.max_norm is None:
        ap.error("--max-norm-out caps the output units at --max-norm: give --max-norm too")
    if args.teacher_mc and (args.teacher_dropout or args.teacher_shifts):
        ap.error("--teacher-mc sets the soft targets: it does not combine with --teacher-dropout or --teacher-shifts")

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_data(os.environ.get("KD_DATA_ROOT", "~/.cache/kd/data"))
    train_x, train_y, val_x, val_y = split_validation(train_x, train_y, args.val_size)
    teacher, _ = load_teacher(resolve_pretrained(args.teacher), "cpu", 784, 10)  # in eval mode
    with torch.no_grad():
        if args.teacher_mc:
            log_p = dropout_mean_log_probs(teacher, train_x, args.T, args.teacher_mc)
        else:
            log_p = combine_log_probs(soft_targets(shifted_logits(teacher, train_x, args.teacher_shifts), args.T),
                                      "arithmetic")

    torch.manual_seed(args.seed)
    student = MLP(args.hidden)
    with torch.no_grad():
        for w in student.parameters():
            w.mul_(args.init)
    if args.opt == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)

    schedule = Recipe(epochs=args.epochs, batch_size=args.batch, lr=args.lr, warmup_epochs=args.warmup)  # kd's onecycle

    @torch.no_grad()
    def errors(x, y):
        return count_errors(predict_logits(student, x), y)["test_errors"]

    steps = train_x.shape[0] // args.batch
    start, diverged = time.time(), False
    for epoch in range(args.epochs):
        order = torch.randperm(train_x.shape[0])
        for i in range(steps):
            idx = order[i * args.batch:(i + 1) * args.batch]
            for group in opt.param_groups:
                group["lr"] = schedule.at(epoch + i / steps)[0]
            if args.teacher_dropout:
                teacher.train()
                with torch.no_grad():
                    batch_log_p = soft_targets(teacher(train_x[idx]), args.T)
            else:
                batch_log_p = log_p[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                z = student(train_x[idx])
            loss = distillation_loss(z.float(), train_y[idx], batch_log_p, args.T, args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.max_norm is not None:
                apply_max_norm_(student, args.max_norm)
                if args.max_norm_out:
                    with torch.no_grad():
                        student.out.weight.renorm_(2, 0, args.max_norm)
        if not math.isfinite(loss.item()):
            print(f"epoch {epoch + 1}: loss {loss.item()}: diverged; no errors are counted from its weights")
            diverged = True
            break
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, {errors(val_x, val_y)} validation errors", flush=True)
    result = {**vars(args), "diverged": diverged,
              "val_errors": None if diverged else errors(val_x, val_y),
              "test_errors": None if diverged else errors(test_x, test_y),
              "seconds": round(time.time() - start), "threads": torch.get_num_threads()}
    print(json.dumps(result))
    if args.json:
        with Path(args.json).open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
