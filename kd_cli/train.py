"""The one training loop every stage uses: in-memory tensors, SGD, a per-step schedule."""
import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import SCHEDULES, SGD_UPDATES
from .data import draw_shifts, elastic_distort, shift_images
from .errors import KDError
from .evaluate import NonFiniteOutputs
from .averaging import WeightAverage
from .models import apply_max_norm_
from .stopping import Interrupted, signal_at_from_env, stop_requests


@dataclass
class Recipe:
    epochs: int
    batch_size: int
    lr: float                   # peak (onecycle, cosine) or initial (exponential) learning rate
    momentum: float = 0.9       # momentum after the ramp
    momentum_start: float = 0.9
    momentum_ramp_epochs: float = 0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup_epochs: float = 0
    lr_decay: float = 1.0       # exponential: multiplier per whole epoch
    lr_times_one_minus_momentum: bool = False
    clip_grad_norm: float | None = None  # rescale a step whose gradient norm exceeds this
    precision: str = "fp32"     # bf16: the forward under bfloat16 autocast; all else float32
    sgd_update: str = "fused"   # fused: one kernel for every parameter | foreach (rounds differently)
    average_last_epochs: int = 0  # end with the mean of the weights of the last N epochs' ends (0: off)

    def at(self, t):
        """(lr, momentum) at fractional epoch t."""
        ramp = min(1.0, t / self.momentum_ramp_epochs) if self.momentum_ramp_epochs > 0 else 1.0
        momentum = self.momentum_start + (self.momentum - self.momentum_start) * ramp
        if self.schedule == "constant":
            lr = self.lr
        elif self.schedule == "exponential":
            lr = self.lr * self.lr_decay ** math.floor(t)
        elif self.schedule == "cosine":
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * t / self.epochs))
        elif self.schedule == "onecycle":
            w = min(self.warmup_epochs, self.epochs)
            if t < w:
                lr = self.lr * t / w
            else:
                lr = self.lr * 0.5 * (1 + math.cos(math.pi * (t - w) / max(self.epochs - w, 1e-9)))
        else:
            raise ValueError(f"unknown schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        if self.lr_times_one_minus_momentum:
            lr *= 1 - momentum
        return lr, momentum


class Diverged(KDError):
    """The loss became NaN or infinite: the run's state is worthless, and resuming would repeat it."""


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    # a state from another kind of device would draw the rest of the run from another generator
    # (preflight refuses it first, provenance._other_device; this holds for any caller)
    if ("cuda" in state) != (device.type == "cuda"):
        raise KDError(f"this run's state was saved on {'cuda' if 'cuda' in state else 'cpu'} and cannot continue "
                      f"on {device.type}: resume it on the kind of device it began on")
    # torch takes RNG states only as CPU byte tensors, and a state.pt loaded onto a GPU
    # (map_location=device) holds them there: without .cpu() no CUDA run could resume
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def train(model, x, y, loss_fn, recipe, *, targets=None, max_norm=None, jitter_pixels=0, elastic=None,
          evaluate=None, eval_every=1, desc="train", state_path=None, state_extra=None, started=None):
    """Train `model` in place on images x [N, 28, 28] with labels y [N] (None for an unlabeled
    transfer set: then no label reaches the loss) and, for a distilled student, `targets(idx, xb,
    shifts)`: what it must match on the batch of images idx, seen as xb, each image moved by its
    jitter code in shifts (None without jitter; data.draw_shifts) and, with `elastic` = (scale,
    sigma), distorted (data.elastic_distort): then targets must run the teacher on xb. Each step calls
    loss_fn(logits, labels or None, targets or None). Before the first epoch, after every
    `eval_every`th and after the last, `evaluate(model)` gives a dict of error counts, kept in the
    history (epoch 0: the untrained model) and shown on the bar; every epoch's row has its loss.

    With `state_path`, the full training state (weights, optimizer, position, every RNG state) is
    saved there atomically after each epoch and when SIGINT/SIGTERM stops the run; if the file
    exists, training continues from it and ends exactly where an uninterrupted run would.
    Returns the history, train_seconds (the loop alone, without evaluation, summed over every
    invocation), invocations (1, plus one per resume that saved a state), earlier_wall_seconds
    (the wall time of the earlier invocations, each from `started`, the perf_counter() at which
    its stage began, to its last saved state) and wall_seconds_partial (resumed from a state saved before
    kd recorded wall time in it: earlier_wall_seconds is then unknown and 0)."""
    if recipe.precision not in ("fp32", "bf16"):  # auto is settled on the device first (prepare.device_of)
        raise ValueError(f"train() needs precision fp32 or bf16, got {recipe.precision!r}")
    if elastic and not getattr(targets, "per_batch", True):  # targets cached for undistorted images
        raise ValueError("train() with elastic distortion needs targets computed on each batch (per_batch)")
    started = time.perf_counter() if started is None else started
    n, device = x.shape[0], x.device
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    # on CPU torch defaults to a Python loop over the parameters; foreach does the loop's float
    # operations (bitwise equal) in one multi-tensor call, fused in one kernel (faster; it rounds
    # some updates differently, so runs draw otherwise)
    if recipe.sgd_update not in SGD_UPDATES:
        raise ValueError(f"train() needs sgd_update one of {', '.join(SGD_UPDATES)}, got {recipe.sgd_update!r}")
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay,
                          **{recipe.sgd_update: True})
    # earlier_wall_seconds: the wall time of the invocations before this one, each counted up to
    # its last saved state, so a resumed run reports the time of the whole run, not its last part
    at = {"epoch": 0, "step": 0, "history": [], "train_seconds": 0.0, "earlier_wall_seconds": 0.0, "invocations": 0,
          "wall_seconds_partial": False}
    average = WeightAverage(model, recipe.average_last_epochs, recipe.epochs)
    resumed = state_path is not None and Path(state_path).exists()
    if resumed:
        state = load_checkpoint(state_path, map_location=device)
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        at.update({k: state[k] for k in ("epoch", "step", "history", "train_seconds")})
        # a state saved before kd recorded wall time had at least one invocation, of unknown time
        at["invocations"] = state.get("invocations", 1)
        at["earlier_wall_seconds"] = state.get("earlier_wall_seconds", 0.0)
        at["wall_seconds_partial"] = state.get("wall_seconds_partial", "earlier_wall_seconds" not in state)
        average.load(state.get("average"))
    at["invocations"] += 1

    def save(epoch, step, loss_sum, rng_epoch, mid_epoch):
        # mid_epoch: this epoch's shuffle and jitter are already drawn (even at step 0, when a stop
        # came during the previous epoch's evaluation); resuming must redraw them from rng_epoch
        if state_path is None:
            return
        with stop.protected():
            save_checkpoint(state_path, {
                **(state_extra or {}), "arch": model.arch, "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "history": at["history"],
                "train_seconds": at["train_seconds"], "invocations": at["invocations"],
                "wall_seconds_partial": at["wall_seconds_partial"],
                "earlier_wall_seconds": at["earlier_wall_seconds"] + time.perf_counter() - started,
                "loss_sum": loss_sum, "rng_epoch": rng_epoch,
                "mid_epoch": mid_epoch, "rng": rng_state(device), "average": average.state()}, durable=False)

    if evaluate is not None and not resumed:  # where it started: the untrained model's errors
        at["history"].append({"epoch": 0, **evaluate(model)})
    bar = tqdm(range(at["epoch"], recipe.epochs), desc=desc, unit="epoch", file=sys.stderr,
               dynamic_ncols=True, initial=at["epoch"], total=recipe.epochs)
    signal_at = signal_at_from_env()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if recipe.precision == "bf16" \
        else contextlib.nullcontext()
    latest = {k: v for row in at["history"] for k, v in row.items()}  # the last loss and counts
    with stop_requests() as stop:
        for epoch in bar:
            start = time.perf_counter()
            model.train()
            first_step, loss_sum = 0, torch.zeros((), device=device)  # summed on device: no sync per step
            mid_epoch = resumed and state.get("mid_epoch", at["step"] > 0)
            if resumed:
                set_rng_state(state["rng_epoch"] if mid_epoch else state["rng"], device)
            rng_epoch = rng_state(device)  # what re-creates this epoch's shuffle and jitter
            # one shuffle (and one jitter) drawn per epoch; each batch is gathered and moved as it
            # comes: two copies of the whole set each epoch cost the students-only table 8% (README)
            perm = torch.randperm(n, device=device)
            shifts = draw_shifts(n, jitter_pixels, device) if jitter_pixels > 0 else None
            ye = None if y is None else y[perm]
            if mid_epoch:  # stopped mid-epoch: continue at the batch it stopped before
                set_rng_state(state["rng"], device)
                first_step, loss_sum = at["step"], state["loss_sum"]
            resumed = False
            for step in range(first_step, steps_per_epoch):
                if signal_at is not None and signal_at[1:] == (epoch, step):
                    signal.raise_signal(signal_at[0])  # runs the handler before it returns
                if stop:
                    at["train_seconds"] += time.perf_counter() - start
                    save(epoch, step, loss_sum, rng_epoch, mid_epoch=True)
                    raise Interrupted(stop.signals[0], epoch, step, saved=state_path is not None)
                lr, momentum = recipe.at(epoch + step / steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = lr, momentum
                s = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
                idx, codes = perm[s], None if shifts is None else shifts[s]
                xb = x[idx] if codes is None else shift_images(x[idx], codes, jitter_pixels)
                if elastic:  # (scale, sigma): each image distorted anew at every step, after its shift
                    xb = elastic_distort(xb, *elastic)
                tb = None if targets is None else targets(idx, xb, codes)
                with autocast:  # bf16: the matrix multiplies in bfloat16, the weights stay float32
                    z = model(xb)
                # the loss (softmaxes, logs, T) in float32 on the logits; a no-op for fp32
                loss = loss_fn(z.float(), None if ye is None else ye[s], tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm, foreach=True)
                opt.step()
                if max_norm:
                    apply_max_norm_(model, max_norm)
                loss_sum += loss.detach()
            mean_loss = float(loss_sum) / steps_per_epoch  # the one sync of the epoch
            at["train_seconds"] += time.perf_counter() - start
            if not math.isfinite(mean_loss):
                lr_now = recipe.at(epoch)[0]
                raise Diverged(f"training diverged at epoch {epoch + 1}: the loss is {mean_loss}; lower lr "
                               f"(peak {recipe.lr:g}, {lr_now:.3g} when the epoch began) or set optim.clip_grad_norm=5")
            row = {"epoch": epoch + 1, "loss": round(mean_loss, 6)}
            averaged = average.after_epoch(model, epoch)
            if evaluate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == recipe.epochs):
                try:  # the loss was finite before the last step; the model after it may not be
                    row.update(evaluate(model))
                    if averaged:  # the averaged weights' errors beside the live ones'
                        row.update(average.evaluated(model, evaluate))
                except NonFiniteOutputs as e:
                    raise Diverged(f"training diverged at epoch {epoch + 1}: {e}") from None
            at["history"].append(row)
            save(epoch + 1, 0, loss_sum, rng_epoch, mid_epoch=False)
            latest = {**latest, **row}  # the bar keeps the latest counted errors between counts
            bar.set_postfix({k: v for k, v in latest.items() if k != "epoch"})
    if average.count:  # the run's result is the averaged model
        model.load_state_dict(average.mean)
    return {k: at[k] for k in ("history", "train_seconds", "earlier_wall_seconds", "invocations",
                               "wall_seconds_partial")}
