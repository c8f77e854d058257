"""Checkpoints: plain dicts of tensors and plain types, written atomically, loaded safely."""
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .errors import KDError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "stage", "arch", "state_dict")


def cpu_weights(model):
    """A model's state_dict as CPU tensors: what a checkpoint stores, loadable on any device."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def write_atomically(path, write, durable=False):
    """Call write(file) on a temporary file in the same folder, then rename it to `path`: a run
    killed mid-write never leaves a half-written file, and a failed write (disk full, read-only,
    no permission) leaves the previous file as it was and no temporary file behind. `durable`
    also flushes to disk (survives power loss, costs time)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KDError(f"could not write in {path.parent}: {e.strerror or e}; choose a writable "
                      "hydra.run.dir") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(e)
        if cause is None:
            raise
        raise KDError(f"could not write {path}: {cause.strerror or cause}; free some space or choose a "
                      "writable hydra.run.dir (the previous file there is intact)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _os_error_in(e):
    """The OSError behind e: torch.save reports a failed write (a full disk) as a RuntimeError
    whose context is the OSError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def save_checkpoint(path, payload, durable=True):
    """A checkpoint (or a resumable state): format version first, then the payload."""
    write_atomically(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **payload}, f), durable)


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
    except Exception:  # torch's readers fail on stray bytes in many ways (KeyError, IndexError, ...)
        raise KDError(f"{path} is not a readable kd checkpoint: truncated, or not a torch file") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise KDError(f"{path} is not a kd checkpoint (missing {', '.join(missing)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise KDError(f"{path} has checkpoint format {ckpt['format_version']}; this kd reads format "
                      f"{FORMAT_VERSION}")
    return ckpt


def check_model(ckpt, path):
    """Refuse what is not a finished, usable model: a run's resumable state (state.pt), a
    malformed record, or non-finite weights (a run that diverged)."""
    path = Path(path)
    if "optimizer" in ckpt:
        raise KDError(f"{path} is the resumable state of an unfinished {ckpt['stage']} run, not a model; "
                      f"continue it with kd {ckpt['stage']} resume={path.parent}, then use its checkpoint.pt")
    arch = ckpt["arch"]
    hidden = arch.get("hidden") if isinstance(arch, dict) else None
    if not (isinstance(hidden, list) and hidden and all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                        for h in hidden)
            and all(isinstance(arch.get(k, 1), int) and arch.get(k, 1) > 0 for k in ("in_features", "out_features"))):
        raise KDError(f"{path} has a malformed architecture record ({arch!r}); it was not written by kd")
    for key in ("config", "metrics"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise KDError(f"{path} has a malformed {key} record; it was not written by kd")
    weights = ckpt["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise KDError(f"{path} has a malformed state_dict; it was not written by kd")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise KDError(f"{path} has non-finite weights (NaN or inf in {bad[0]}): the run that wrote it "
                      "diverged; retrain it (lower lr)")
    return ckpt


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PRETRAINED = "pretrained"  # teacher=pretrained, checkpoint=pretrained: the teacher shipped with kd


def pretrained_folder():
    from importlib.resources import files

    return Path(str(files("kd_cli.pretrained")))


def resolve_pretrained(path):
    """`pretrained` -> the shipped teacher's checkpoint, checked against its recorded sha256 (a
    damaged copy, or the pointer file Git LFS leaves, is refused); any other path as given."""
    if str(path) != PRETRAINED:
        return path
    folder = pretrained_folder()
    ckpt, digest = folder / "teacher.pt", folder / "teacher.sha256"
    if not ckpt.is_file() or not digest.is_file():
        raise KDError(f"no pretrained teacher ships with this copy of kd ({ckpt} is missing); train one with "
                      "kd train-teacher, or pass teacher=<path to checkpoint.pt>")
    expected = (digest.read_text().split() or [""])[0]
    if sha256_of(ckpt) != expected:
        raise KDError(f"{ckpt} does not match its sha256 in {digest.name}: a damaged copy (or a Git LFS "
                      "pointer); fetch the file again")
    return ckpt


def teacher_override(path):
    """The `teacher=` value naming this teacher to a kd run started from any folder: `pretrained`
    stays kd's name for the shipped one (not ./pretrained); any other path becomes absolute."""
    return PRETRAINED if str(path) == PRETRAINED else str(Path(path).resolve())


def newest_checkpoint(outputs, stage):
    """The most recently written checkpoint.pt of `stage` under outputs/ (single runs and sweeps)."""
    outputs = Path(outputs)
    found = [*outputs.glob(f"{stage}/*/checkpoint.pt"), *outputs.glob(f"{stage}-sweep/*/*/checkpoint.pt")]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def save_json(path, obj):
    """metrics.json, written like a checkpoint: whole or not at all."""
    write_atomically(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
