"""Finding and loading a teacher, and its soft targets computed once per run."""
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, newest_checkpoint, sha256_of
from .errors import KDError
from .models import build_mlp

TEACHER_STAGE = "train-teacher"


def resolve_teacher(teacher, outputs="outputs"):
    """The teacher's checkpoint path: the one given, or the newest `kd train-teacher` wrote."""
    if teacher is None:
        path = newest_checkpoint(outputs, TEACHER_STAGE)
        if path is None:
            raise KDError(f"no teacher found under {Path(outputs).resolve()}/{TEACHER_STAGE}*; run "
                          "`kd train-teacher` first, or pass teacher=<path to checkpoint.pt>")
        return path
    if not isinstance(teacher, (str, Path)):
        raise KDError(f"teacher must be one checkpoint path, got {teacher!r}")
    path = Path(teacher).expanduser()
    if not path.is_file():
        raise KDError(f"teacher checkpoint not found: {path}; pass teacher=<path to checkpoint.pt>")
    return path


def load_teacher(path, device, in_features, out_features):
    """The teacher model in eval mode, and what a distilled student records about it."""
    ckpt = load_checkpoint(path)
    arch = ckpt["arch"]
    if (arch.get("in_features"), arch.get("out_features")) != (in_features, out_features):
        raise KDError(f"teacher {path} maps {arch.get('in_features')} inputs to {arch.get('out_features')} "
                      f"classes; this data set needs {in_features} -> {out_features}")
    model = build_mlp(arch)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KDError(f"teacher {path}: weights do not match its architecture ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    info = {"path": str(Path(path).resolve()), "sha256": sha256_of(path),
            "stage": ckpt["stage"], "test_errors": ckpt.get("metrics", {}).get("test_errors")}
    return model, info


@torch.no_grad()
def teacher_logits(model, x, batch_size=10000):
    """Logits of the teacher over the (unaugmented) transfer set: computed once, not per batch.
    no_grad rather than inference_mode: the soft targets are saved for the student's backward."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])
