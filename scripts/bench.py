"""Training speed: kd against a bare PyTorch loop (the floor) and the usual DataLoader pipeline.

    python scripts/bench.py [--json out.json] [--repeats 3] [--device cpu|cuda] [--precision fp32|bf16]

One process, same machine, same data (real MNIST from KD_DATA_ROOT, 60,000 training images):
  floor     a bare loop over in-memory tensors written here with stock torch modules (nn.Dropout,
            a gather-based jitter, renorm for max-norm), no kd code
  kd        kd_cli.train.train doing the same work (its own dropout, jitter, max-norm, schedule)
  pipeline  torchvision's MNIST with ToTensor() through a DataLoader (num_workers 0 and 2)
  sgemm     the machine's matrix-multiply rate at the layers' shapes, against which the achieved
            model GFLOP/s of each loop is set
Seconds per epoch are medians over --repeats epochs (after one warm-up epoch). Prints a Markdown
table and, with --json, writes every number and the ratios under "ratios". --precision bf16 runs
every training forward, floor and kd alike, under bfloat16 autocast (kd's precision=bf16): two
runs, fp32 and bf16, give the bf16/fp32 epoch-time ratio of each loop.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.data import load_data
from kd_cli.losses import distillation_loss, hard_label_loss, soft_targets
from kd_cli.models import MLP
from kd_cli.teachers import SoftTargets, teacher_logits
from kd_cli.train import Recipe, train

TEACHER = dict(hidden=[1200, 1200], dropout_input=0.2, dropout_hidden=0.5)
STUDENT = dict(hidden=[800, 800])
MAX_NORM, JITTER, ALPHA = 3.873, 2, 0.1
T_PAPER, T_DEFAULT = 20.0, 5.0  # recipe=paper's unaugmented distillation; kd distill's default (jittered)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_flops_per_image(hidden):
    """Forward + backward of the Linear layers: 3 x 2 x multiply-adds."""
    widths = [784, *hidden, 10]
    return 6 * sum(a * b for a, b in zip(widths, widths[1:]))


# ---- the floor: what a careful user writes by hand, with stock torch ------------------------------

def floor_model(hidden, dropout_input=0.0, dropout_hidden=0.0):
    layers, width = [nn.Flatten(), nn.Dropout(dropout_input)], 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout_hidden)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def floor_jitter(x, s):
    n = x.shape[0]
    padded = F.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * s + 1, (n, 1, 1), device=x.device)
    rows = dy + torch.arange(28, device=x.device).view(1, 28, 1)
    cols = dx + torch.arange(28, device=x.device).view(1, 1, 28)
    return padded[torch.arange(n, device=x.device).view(n, 1, 1), rows, cols]


OPTIMIZERS = {}


def floor_epoch(model, x, y, batch_size, log_p=None, jitter=0, max_norm=None, precision="fp32"):
    """One epoch of the bare loop; bf16: the forward under bfloat16 autocast, as kd's precision=bf16."""
    if model not in OPTIMIZERS:
        OPTIMIZERS[model] = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    opt = OPTIMIZERS[model]
    model.train()
    perm = torch.randperm(x.shape[0], device=x.device)
    xs, ys = x[perm], y[perm]
    ps = log_p[perm] if log_p is not None else None
    if jitter:
        xs = floor_jitter(xs, jitter)
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    for i in range(0, x.shape[0], batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            z = model(xs[i:i + batch_size])
        z = z.float()
        if ps is None:
            loss = F.cross_entropy(z, ys[i:i + batch_size])
        else:
            loss = distillation_loss(z, ys[i:i + batch_size], ps[i:i + batch_size], T_PAPER, ALPHA)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if max_norm:
            with torch.no_grad():
                for layer in hidden:
                    layer.weight.renorm_(2, 0, max_norm)



def timed(fn, repeats, device):
    fn()  # warm-up: allocations, thread pools, kernels
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kd_epoch_seconds(model, x, y, loss_fn, batch_size, repeats, jitter=0, max_norm=None, targets=None,
                     precision="fp32"):
    recipe = Recipe(epochs=1 + repeats, batch_size=batch_size, lr=0.05, momentum=0.9, nesterov=True,
                    schedule="cosine", precision=precision)
    # the end-of-epoch callback stamps the clock (after the epoch's one sync): epoch k's time is
    # the gap between stamps k-1 and k, so the first (warm-up) epoch is left out
    out = train(model, x, y, loss_fn, recipe, targets=targets, max_norm=max_norm, jitter_pixels=jitter,
                evaluate=lambda m: {"t": time.perf_counter()})
    stamps = [row["t"] for row in out["history"][1:]]  # history[0] is stamped before training
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def pipeline_epoch_seconds(root, batch_size, workers, device):
    from torchvision import datasets, transforms

    ds = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    model = floor_model(STUDENT["hidden"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    def epoch():
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(epoch, 1, device)  # one warm-up and one timed epoch: each takes a while


def sgemm_gflops(hidden, batch_size, device, repeats=20, precision="fp32"):
    """The matmul rate at the model's shapes: forward, grad-input and grad-weight of each layer, in
    float32 (bfloat16 with --precision bf16, the dtype autocast gives the matmuls)."""
    widths = [784, *hidden, 10]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mats = [(torch.randn(batch_size, a, device=device, dtype=dtype), torch.randn(b, a, device=device, dtype=dtype),
             torch.randn(batch_size, b, device=device, dtype=dtype)) for a, b in zip(widths, widths[1:])]

    def step():
        for x, w, g in mats:
            x @ w.t(), g @ w, g.t() @ x

    seconds = timed(lambda: [step() for _ in range(repeats)], 3, device)
    return model_flops_per_image(hidden) * batch_size * repeats / seconds / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per measurement (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher-batch", type=int, default=500, help="the default teacher recipe's batch")
    ap.add_argument("--student-batch", type=int, default=100, help="the default student recipe's batch")
    ap.add_argument("--limit", type=int, default=None, help="only the first N training images (a smoke run)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: every training forward under bfloat16 autocast, as kd's precision=bf16")
    args = ap.parse_args()
    device = torch.device(args.device)
    # kd's stages flush float32 denormals to zero; every loop here runs so too, so the ratios compare
    # loops, not float modes (with denormals a distill epoch can take 2x as long, floor or kd alike)
    torch.set_flush_denormal(True)
    root = os.environ.get("KD_DATA_ROOT", "data")
    x, y, _, _ = load_data(root, download=False, device=device, train_limit=args.limit)
    n = x.shape[0]
    tb, sb, r, p = args.teacher_batch, args.student_batch, args.repeats, args.precision
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    res = {"device": str(device), "machine": machine,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "images_per_epoch": n,
           "precision": args.precision,
           "teacher_batch": tb, "student_batch": sb, "seconds_per_epoch": {}}
    sec = res["seconds_per_epoch"]

    def log(name, value):
        sec[name] = round(value, 4)
        print(f"{name:<28} {value:8.3f} s/epoch", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    teacher = MLP(**TEACHER).to(device)
    floor_t = floor_model(**TEACHER).to(device)
    log("floor_teacher", timed(lambda: floor_epoch(floor_t, x, y, tb, jitter=JITTER, max_norm=MAX_NORM, precision=p), r, device))
    log("kd_teacher", kd_epoch_seconds(teacher, x, y, hard_label_loss, tb, r, jitter=JITTER, max_norm=MAX_NORM, precision=p))

    floor_s = floor_model(STUDENT["hidden"]).to(device)
    log("floor_student", timed(lambda: floor_epoch(floor_s, x, y, sb, precision=p), r, device))
    log("kd_student", kd_epoch_seconds(MLP(**STUDENT).to(device), x, y, hard_label_loss, sb, r, precision=p))

    log_p = soft_targets(teacher_logits(teacher, x), T_PAPER)
    floor_d = floor_model(STUDENT["hidden"]).to(device)
    log("floor_distill", timed(lambda: floor_epoch(floor_d, x, y, sb, log_p=log_p, precision=p), r, device))
    distill_loss = lambda z, yb, lp: distillation_loss(z, yb, lp, T_PAPER, ALPHA)  # noqa: E731
    log("kd_distill", kd_epoch_seconds(MLP(**STUDENT).to(device), x, y, distill_loss, sb, r,
                                       targets=SoftTargets([teacher], T_PAPER, x), precision=p))
    default_loss = lambda z, yb, lp: distillation_loss(z, yb, lp, T_DEFAULT, ALPHA)  # noqa: E731
    start = time.perf_counter()  # the teacher over the 25 shifted copies: once a run, not per epoch
    shifted = SoftTargets([teacher], T_DEFAULT, x, max_shift=JITTER)
    sync(device)
    res["distill_augmented_setup_seconds"] = round(time.perf_counter() - start, 2)
    print(f"{'distill_augmented_setup':<28} {res['distill_augmented_setup_seconds']:8.3f} s once", file=sys.stderr)
    log("kd_distill_augmented", kd_epoch_seconds(
        MLP(**STUDENT).to(device), x, y, default_loss, sb, r, jitter=JITTER, targets=shifted, precision=p))

    if device.type == "cpu" and args.limit is None:  # torchvision's data set has all 60,000
        for workers in (0, 2):
            log(f"pipeline_student_workers{workers}", pipeline_epoch_seconds(root, sb, workers, device))

    reps = 20 if args.limit is None else 2  # a smoke run: a rough matmul rate is enough
    res["sgemm_gflops"] = {"teacher": round(sgemm_gflops(TEACHER["hidden"], tb, device, reps, p), 1),
                           "student": round(sgemm_gflops(STUDENT["hidden"], sb, device, reps, p), 1)}
    flops = {"teacher": model_flops_per_image(TEACHER["hidden"]) * n,
             "student": model_flops_per_image(STUDENT["hidden"]) * n}
    res["achieved_gflops"] = {
        name: round(flops["teacher" if "teacher" in name else "student"] / s / 1e9, 1)
        for name, s in sec.items() if "augmented" not in name}
    ratios = {
        "kd_over_floor_teacher": sec["kd_teacher"] / sec["floor_teacher"],
        "kd_over_floor_student": sec["kd_student"] / sec["floor_student"],
        "kd_over_floor_distill": sec["kd_distill"] / sec["floor_distill"],
        "distill_over_student": sec["kd_distill"] / sec["kd_student"],
        "distill_augmented_over_student": sec["kd_distill_augmented"] / sec["kd_student"],
    }
    if "pipeline_student_workers0" in sec:
        best_pipeline = min(sec["pipeline_student_workers0"], sec["pipeline_student_workers2"])
        ratios["pipeline_over_kd"] = best_pipeline / sec["kd_student"]
    res["ratios"] = {k: round(v, 3) for k, v in ratios.items()}

    targets = {"kd_over_floor_teacher": "<= 1.10", "kd_over_floor_student": "<= 1.10",
               "kd_over_floor_distill": "<= 1.10", "distill_over_student": "<= 1.15",
               "pipeline_over_kd": ">= 3"}
    lines = [f"Device: {device} ({res['machine']}, {res['threads']} threads), torch {res['torch']}, {args.precision}; "
             f"batch {tb} (teacher), {sb} (student, distill); median of {r} epochs of {n} images.", "",
             f"| loop | s/epoch | model GFLOP/s | {args.precision} matmul GFLOP/s at these shapes |", "| --- | --- | --- | --- |"]
    for name, s in sec.items():
        kind = "teacher" if "teacher" in name else "student"
        lines.append(f"| {name} | {s:.2f} | {res['achieved_gflops'].get(name, '-')} | {res['sgemm_gflops'][kind]} |")
    lines += ["", "| ratio | measured | target |", "| --- | --- | --- |"]
    for k, v in res["ratios"].items():
        lines.append(f"| {k} | {v:.2f} | {targets.get(k, '(shown)')} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
