"""The one training loop every stage uses: in-memory tensors, SGD, a per-step schedule."""
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .data import jitter
from .errors import KDError
from .models import apply_max_norm_

SCHEDULES = ("onecycle", "cosine", "exponential", "constant")


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


def train(model, x, targets, loss_fn, recipe, *, max_norm=None, jitter_pixels=0, evaluate=None,
          desc="train"):
    """Train `model` in place on images x [N, 28, 28] and per-image `targets` (a tuple of tensors
    indexed like x), calling loss_fn(logits, *batch_targets). After each epoch `evaluate(model)`
    gives a dict of error counts, kept in the history and shown on the bar. Returns the history and train_seconds (the loop alone,
    without evaluation)."""
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    history, train_seconds = [], 0.0
    bar = tqdm(range(recipe.epochs), desc=desc, unit="epoch", file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        # one shuffle (and one jitter) per epoch; the batches are then contiguous slices
        perm = torch.randperm(n, device=x.device)
        xe = jitter(x[perm], jitter_pixels)
        te = [t[perm] for t in targets]
        loss_sum = torch.zeros((), device=x.device)  # summed on the device: no sync per step
        for step in range(steps_per_epoch):
            lr, momentum = recipe.at(epoch + step / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"], group["momentum"] = lr, momentum
            s = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
            loss = loss_fn(model(xe[s]), *(t[s] for t in te))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if max_norm:
                apply_max_norm_(model, max_norm)
            loss_sum += loss.detach()
        mean_loss = float(loss_sum) / steps_per_epoch  # the one sync of the epoch
        train_seconds += time.perf_counter() - start
        if not math.isfinite(mean_loss):
            raise KDError(f"training diverged at epoch {epoch + 1} (loss {mean_loss}); lower lr")
        row = {"epoch": epoch + 1, "loss": round(mean_loss, 6)}
        if evaluate is not None:
            row.update(evaluate(model))
        history.append(row)
        bar.set_postfix({k: v for k, v in row.items() if k != "epoch"})
    return {"history": history, "train_seconds": train_seconds}
