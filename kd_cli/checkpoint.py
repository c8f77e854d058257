"""Checkpoints: plain dicts of tensors and plain types, written atomically, loaded safely."""
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import KDError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "stage", "arch", "state_dict")


def cpu_weights(model):
    """A model's state_dict as CPU tensors: what a checkpoint stores, loadable on any device."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path, payload, durable=True):
    """Write to a temporary file in the same folder, then rename: a run killed mid-write never
    leaves a half-written file behind, and a failed write (disk full, no permission) leaves the
    previous file as it was. `durable` also flushes to disk (survives power loss, costs time)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KDError(f"could not write in {path.parent}: {e.strerror or e}; choose a writable "
                      "hydra.run.dir") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise KDError(f"could not write {path}: {e.strerror or e}; free some space or choose a writable "
                      "hydra.run.dir (the previous file there is intact)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Load a kd checkpoint with weights_only=True (nothing in the file can run code), and check
    it is one: a clear KDError for a missing, truncated, foreign or newer-format file."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise KDError(f"{path} is not a kd checkpoint: it holds objects other than tensors and plain "
                      "types, or is not a torch file (refused; nothing in it was run)") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError):
        raise KDError(f"{path} is not a readable kd checkpoint: truncated, or not a torch file") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise KDError(f"{path} is not a kd checkpoint (missing {', '.join(missing)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise KDError(f"{path} has checkpoint format {ckpt['format_version']}; this kd reads format "
                      f"{FORMAT_VERSION}")
    return ckpt


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def newest_checkpoint(outputs, stage):
    """The most recently written checkpoint.pt of `stage` under outputs/ (single runs and sweeps)."""
    outputs = Path(outputs)
    found = [*outputs.glob(f"{stage}/*/checkpoint.pt"), *outputs.glob(f"{stage}-sweep/*/*/checkpoint.pt")]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def save_json(path, obj):
    """metrics.json, written like a checkpoint: whole or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
