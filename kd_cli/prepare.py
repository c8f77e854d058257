"""From a checked config to what a stage works with: the device, the seeded RNG, the data (split
into training, validation and test, the training part cut to the transfer set), the model, the
recipe, and the per-epoch error counts. The config was checked once (config.py); here it is
only read."""
import sys

import torch

from .checkpoint import load_checkpoint
from .data import load_data, split_validation, transfer_set
from .errors import KDError
from .evaluate import count_errors, predict_logits
from .models import MLP
from .train import Recipe


def device_of(cfg, state_path=None):
    """The run's device, with its precision settled on it: cfg.precision=auto becomes bf16 where
    the device computes bfloat16 natively and fp32 elsewhere, here, so that the recipe,
    metrics.json and the checkpoint's config record what ran. A run resumed from `state_path` keeps the
    precision it started with (auto could settle otherwise on another machine)."""
    # Flush denormals to zero: as a distilled student grows confident, float32 underflow makes
    # denormal values that the CPU handles ~2x slower (a distill epoch went from 1.1 s to 2.4 s
    # on 20k images); results were the same to the last test error.
    torch.set_flush_denormal(True)
    device = device_named(cfg.device)
    if "precision" in cfg:
        if state_path is not None:  # what it started in; a state saved before auto: fp32, the default then
            cfg.precision = load_checkpoint(state_path).get("precision") or \
                ("fp32" if cfg.precision == "auto" else cfg.precision)
        elif cfg.precision == "auto":
            cfg.precision = auto_precision(device)
        warn_if_slow(cfg, device)
    return device


def device_named(name):
    """device=auto: the GPU where there is one, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def auto_precision(device):
    """What precision=auto settles to on `device`."""
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device):
    """Does the device compute bfloat16 natively? CUDA: torch says. CPU: the avx512_bf16 or
    amx_bf16 flag (Linux); without them bfloat16 is emulated: correct, but on an AVX2-only EPYC
    a student epoch took 64 s against 5.8 s in float32."""
    if device.type == "cuda":  # the run's GPU; not counting emulation, which torch counts by default
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags():
    """The CPU's instruction-set flags (Linux's /proc/cpuinfo; none elsewhere)."""
    return set(first_processor(cpuinfo()).get("flags", "").split())


def cpuinfo():
    """Linux's /proc/cpuinfo, or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def first_processor(text):
    """The fields of the first processor a /proc/cpuinfo text lists, as {name: value}."""
    first = text.split("\n\n")[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def warn_if_slow(cfg, device):
    if cfg.get("precision") == "bf16" and not native_bf16(device):
        print(f"kd: warning: precision=bf16 on a {device.type} without native bfloat16 (emulated: the same "
              "kind of result, but slower than precision=fp32)", file=sys.stderr, flush=True)


def data_of(cfg, device):
    """Seed, then load: (train_x, train_y, test_x, test_y, val or None) with the training part
    cut to the transfer set, and what that transfer set is."""
    torch.manual_seed(int(cfg.seed))
    limit = cfg.data.train_limit
    train_x, train_y, test_x, test_y = load_data(cfg.data.root, cfg.data.download, device,
                                                  None if limit is None else int(limit), cfg.data.name)
    val = None
    if cfg.data.val_size:
        if cfg.data.val_size >= train_x.shape[0]:
            raise KDError(f"data.val_size={cfg.data.val_size} leaves no training images "
                          f"(there are {train_x.shape[0]})")
        # the split stages._validation_for cuts again for fit_bias: the two must stay the same cut
        train_x, train_y, *val = split_validation(train_x, train_y, int(cfg.data.val_size))
    t = cfg.data.transfer
    train_x, train_y, transfer = transfer_set(train_x, train_y, t.exclude, t.include,
                                              float(t.fraction), int(t.seed))
    return (train_x, train_y, test_x, test_y, val), transfer


def recipe_of(cfg):
    o = cfg.optim
    return Recipe(epochs=int(cfg.epochs), batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                  momentum=float(o.momentum), momentum_start=float(o.momentum_start),
                  momentum_ramp_epochs=float(o.momentum_ramp_epochs), nesterov=bool(o.nesterov),
                  weight_decay=float(o.weight_decay), schedule=o.schedule,
                  warmup_epochs=float(o.warmup_epochs), lr_decay=float(o.lr_decay),
                  lr_times_one_minus_momentum=bool(o.lr_times_one_minus_momentum),
                  clip_grad_norm=None if o.get("clip_grad_norm") is None else float(o.clip_grad_norm),
                  precision=cfg.precision, sgd_update=str(cfg.sgd_update),
                  average_last_epochs=int(o.get("average_last_epochs") or 0))


def elastic_of(cfg):
    """(scale, sigma) of data.elastic for the training loop, or None when it is off."""
    e = cfg.data.get("elastic")
    return (float(e.scale), float(e.sigma)) if e is not None and float(e.scale) > 0 else None


def model_of(cfg, device, in_features, out_features=10):
    m = cfg.model
    return MLP(hidden=list(m.hidden), in_features=in_features, out_features=out_features,
               dropout_input=m.dropout_input, dropout_hidden=m.dropout_hidden).to(device)


def errors_fn(test_x, test_y, val, batch_size):
    """Per-epoch monitoring: test errors, and validation errors when a split is held out."""
    def errors(model):
        row = {"test_errors": count_errors(predict_logits(model, test_x, batch_size), test_y)["test_errors"]}
        if val is not None:
            row["val_errors"] = count_errors(predict_logits(model, val[0], batch_size), val[1])["test_errors"]
        return row
    return errors
