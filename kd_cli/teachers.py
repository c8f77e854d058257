"""Finding and loading teachers (one, or an ensemble), combining them, and their logits."""
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import check_model, load_checkpoint, newest_checkpoint, resolve_pretrained, sha256_of
from .config import COMBINE
from .data import every_shift, shift_codes
from .errors import KDError
from .losses import soft_targets
from .models import build_mlp
from .provenance import trained_on_other_files

TEACHER_STAGE = "train-teacher"


def resolve_teacher(teacher, outputs="outputs", key="teacher"):
    """The teachers' checkpoint paths (a list): the newest `kd train-teacher` wrote when none is
    given; a path (`pretrained`: the teacher shipped with kd); a list of paths (an ensemble); or a
    folder: a run's folder is its checkpoint.pt (not the runs a user saved inside it), a sweep's is
    every job's (a seed sweep of teachers: teacher=outputs/train-teacher-sweep/<stamp>). key: the
    option it came from, for the messages."""
    if teacher is None:
        path = newest_checkpoint(outputs, TEACHER_STAGE)
        if path is None:
            raise KDError(f"no teacher found under {Path(outputs).resolve()}/{TEACHER_STAGE}*; run "
                          f"`kd train-teacher` first, or pass {key}=<path to checkpoint.pt>")
        return [path]
    paths = []
    for item in _items(teacher):
        if not isinstance(item, (str, Path)):
            raise KDError(f"{key} must be a checkpoint path or a list of them, got {teacher!r}")
        path = Path(resolve_pretrained(item)).expanduser()
        if path.is_dir():
            _check_whole_sweep(path)
            if (path / ".hydra").is_dir() and not (path / "checkpoint.pt").is_file():  # a run, not a sweep
                raise KDError(f"the {key} folder {path} is a run that has not finished (no checkpoint.pt); "
                              f"finish it (kd <stage> resume={path}) or pass another {key}")
            found = [path / "checkpoint.pt"] if (path / "checkpoint.pt").is_file() else \
                sorted(path.glob("*/checkpoint.pt"))
            if not found:
                raise KDError(f"no checkpoint.pt in the {key} folder {path} or its job folders")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise KDError(f"{key} checkpoint not found: {path}; pass {key}=<path to checkpoint.pt>")
    if not paths:
        raise KDError(f"{key}=[] names no checkpoint")
    return paths


def resolve_generalist(generalist, outputs="outputs"):
    """The one checkpoint the specialists start from (resolve_teacher's rules): a folder of
    several teachers is refused, since which of them would be a guess."""
    paths = resolve_teacher(generalist, outputs, key="generalist")
    if len(paths) > 1:
        raise KDError(f"generalist={generalist} names {len(paths)} checkpoints ({paths[0]}, {paths[1]}, ...); "
                      "the specialists start from one generalist: pass one checkpoint.pt")
    return paths[0]


def resolve_checkpoints(checkpoint):
    """kd evaluate's checkpoint= (one path, `pretrained`, a run's folder, or a list: an ensemble) as
    paths. A folder is its run's checkpoint.pt; a sweep's folder is refused: evaluated as one
    ensemble or job by job is the user's choice, not a guess."""
    paths = []
    for path in (Path(resolve_pretrained(p)).expanduser() for p in _items(checkpoint)):
        if path.is_dir() and (path / "checkpoint.pt").is_file():
            path = path / "checkpoint.pt"
        elif path.is_dir():
            from .jobs import is_search_folder

            jobs = sorted(path.glob("*/checkpoint.pt"))
            if jobs and is_search_folder(path):
                raise KDError(f"{path} is a search: its trials are candidates; pass the chosen trial's checkpoint.pt "
                              f"(kd report {path} names the best by validation)")
            raise KDError(f"no checkpoint.pt in the folder {path}" + (
                f"; its {len(jobs)} job(s) have one each: pass one, or a list of them to evaluate as an "
                f"ensemble (checkpoint=['{jobs[0]}',...])" if jobs else ""))
        if not path.is_file():
            raise KDError(f"checkpoint not found: {path}; pass checkpoint=<path to checkpoint.pt>")
        paths.append(path)
    return paths


def _items(value):
    """A path option's value as a list: a list as it is, anything else as the one item."""
    return list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]


# per stage: the key naming the checkpoints it reads, how the stage resolves that key to files, and
# the key under which its record (metrics.json, state.pt) keeps their paths and sha256
READS = {"distill": ("teacher", resolve_teacher, "teacher"),
         "train-specialists": ("generalist", lambda v: [resolve_generalist(v)], "generalist"),
         "evaluate": ("checkpoint", resolve_checkpoints, "checkpoint_files")}


def _check_whole_sweep(folder):
    """A sweep folder as teacher= is an ensemble of all its jobs: refused while a job is missing (it
    failed, stopped or never started: the ensemble would silently be smaller), and for a search,
    whose trials are candidates to choose from, not members."""
    if not (folder / "multirun.yaml").is_file():
        return
    from .jobs import rows_of
    from .run import is_search

    if is_search(OmegaConf.load(folder / "multirun.yaml").hydra):
        raise KDError(f"{folder} is a search: its trials are candidates, not an ensemble; pass the chosen "
                      f"trial's checkpoint.pt (kd report {folder} names the best by validation)")
    missing = [r for r in rows_of([folder]) if r["status"] != "done"]
    if missing:
        raise KDError(f"teacher folder {folder}: {len(missing)} job(s) did not finish ({Path(missing[0]['job']).name}: "
                      f"{missing[0]['status']}); finish the sweep (resume={folder}) or pass the checkpoints to use "
                      "as a list")


def trained_on(ckpt):
    """The data set a checkpoint was trained on (checkpoints from before data.name: MNIST)."""
    return ((ckpt.get("config") or {}).get("data") or {}).get("name", "mnist")


def check_same_data(ckpt, path, name, role, root=None):
    """Refuse a checkpoint trained on another data set, or (given the data root) on other files of
    this one than those under root: a teacher trained on files whose training images include these
    test images, or whose labels differ, would make every number downstream mean something else.
    Held to its record of the training files where it has one, else to that of all four (then
    another test set alone counts as other files); checkpoints from before kd recorded either pass
    on the name (the shipped teacher has both records since 2026-12-06)."""
    if trained_on(ckpt) != name:
        raise KDError(f"{role} {path} was trained on {trained_on(ckpt)}, this run uses {name}; "
                      f"pass data={trained_on(ckpt)} or another {role}")
    other = None if root is None else trained_on_other_files(ckpt.get("metrics"), root, name)
    if other:
        raise KDError(f"{role} {path} was trained on other {name} {other} than those under data.root={root}: set "
                      f"KD_DATA_ROOT to the folder it trained from, or train a {role} on these files")


def load_model(path, device, data_name, role="checkpoint", data_root=None):
    """(checkpoint dict, its model on `device`) for any kd checkpoint, refusing one trained on
    another data set (or on other files of it than those under data_root, where given) or whose
    weights do not fit its architecture."""
    ckpt = check_model(load_checkpoint(path), path)
    if ckpt.get("stage") == "train-specialists":  # its state_dict is the generalist alone
        generalist = (ckpt.get("teacher") or {}).get("path", "the generalist it names")
        raise KDError(f"{role} {path} is a generalist with specialists, which count only together (its "
                      f"metrics.json has their test errors); as a single model pass the generalist: {generalist}")
    check_same_data(ckpt, path, data_name, role, data_root)
    model = build_mlp(ckpt["arch"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KDError(f"{role} {path}: weights do not match its architecture ({str(e).splitlines()[0]})") from None
    return ckpt, model.to(device)


def load_teacher(path, device, in_features, out_features, data_name="mnist", data_root=None, role="teacher"):
    """The teacher model in eval mode, and what a distilled student records about it. data_root:
    where the run's data files are, to refuse a teacher trained on other ones (None: unchecked, for
    scripts that hold the teacher to nothing)."""
    ckpt, model = load_model(path, device, data_name, role, data_root)
    arch = ckpt["arch"]
    if (arch.get("in_features"), arch.get("out_features")) != (in_features, out_features):
        raise KDError(f"{role} {path} maps {arch.get('in_features')} inputs to {arch.get('out_features')} "
                      f"classes; this data set needs {in_features} -> {out_features}")
    model.eval()
    info = {"path": str(Path(path).resolve()), "sha256": sha256_of(path),
            "stage": ckpt["stage"], "test_errors": (ckpt.get("metrics") or {}).get("test_errors")}
    return model, info


def combine_log_probs(log_probs, how):
    """One distribution from several teachers' log-probabilities, as log-probabilities: a tensor
    [K, N, C], or an iterable of K tensors [..., C] read one at a time (an ensemble's 25 shifted
    copies are 60 MB a teacher). Arithmetic, the mean of the probabilities, log(mean_k p_k);
    geometric, the normalised geometric mean, softmax(mean_k log p_k). Neither is the softmax of
    the mean logit (at T, that is the geometric mean only when every teacher shares T; the
    arithmetic mean never)."""
    if how not in COMBINE:
        raise KDError(f"teacher_combine must be one of {', '.join(COMBINE)}, got {how!r}")
    total, k = None, 0
    for log_p in log_probs:
        if total is None:
            total = log_p
        elif how == "arithmetic":
            total = torch.logaddexp(total, log_p)  # log sum_k p_k
        else:
            total = total + log_p  # sum_k log p_k
        k += 1
    if k == 1:
        return total
    return total - math.log(k) if how == "arithmetic" else torch.log_softmax(total / k, dim=-1)


def mean_logits(logits):
    """The teachers' mean logit (loss=logit_mse), from an iterable of their logits, one at a time."""
    total, k = None, 0
    for v in logits:
        total, k = (v if total is None else total + v), k + 1
    return total if k == 1 else total / k


@torch.no_grad()
def teacher_logits(model, x, batch_size=10000):
    """Logits of the teacher over a whole (transfer) set, in chunks of batch_size. no_grad rather
    than inference_mode: the soft targets are saved for the student's backward."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


def shifted_logits(model, x, max_shift, batch_size=10000):
    """The teacher's logits over x moved by each jitter code k (data.draw_shifts), as [codes, N, C]:
    over x itself, [1, N, C], when max_shift is 0."""
    if max_shift == 0:
        return teacher_logits(model, x, batch_size)[None]
    out = None
    for k, moved in every_shift(x, max_shift):
        row = teacher_logits(model, moved, batch_size)
        if out is None:
            out = row.new_empty((shift_codes(max_shift), *row.shape))
        out[k] = row
    return out


def caches_shifts(epochs, max_shift):
    """Whether a run of `epochs` on a transfer set jittered by up to max_shift px runs its teachers
    once over every shifted copy of the set ((2 max_shift + 1)^2 passes, before training) rather
    than on each batch (one pass an epoch): whichever runs them fewer times."""
    return max_shift > 0 and epochs >= shift_codes(max_shift)


class SoftTargets:
    """What a distilled student matches, batch by batch: the teachers' combined log-probabilities
    at T (loss=kd), or their mean logit (loss=logit_mse). The teachers run in eval mode and outside
    autograd. Without jitter they run once, over the transfer set `x`. With a transfer set jittered
    by up to `max_shift` px they run either on each batch as the student sees it (`per_batch`, also
    for a distorted transfer set, whose every batch is new) or,
    once, over each of the set's (2 max_shift + 1)^2 shifted copies (25 at 2 px: 60 MB for MNIST),
    instead of once an epoch (60 times in the default recipe): see caches_shifts. Run once, each
    teacher's logits come from `logits_of(i, teacher)` ([codes, N, C], shifted_logits' layout;
    shifted_logits itself by default, teacher_cache's file of an earlier run in kd distill).
    Called as targets(idx, xb, shifts): the batch's indices into the transfer set, its images as
    the student sees them, and their jitter codes (data.draw_shifts; None without jitter)."""

    def __init__(self, teachers, T, x, loss="kd", combine="arithmetic", max_shift=0, per_batch=False,
                 batch_size=10000, logits_of=None):
        self.teachers, self.T, self.loss, self.combine = list(teachers), float(T), loss, combine
        self.batch_size, self.max_shift = batch_size, int(max_shift)
        self.per_batch, self.cached = per_batch, None
        if self.per_batch:
            return
        logits_of = logits_of or (lambda i, teacher: shifted_logits(teacher, x, self.max_shift, batch_size))
        self.cached = self.combined(logits_of(i, t) for i, t in enumerate(self.teachers))
        if self.max_shift == 0:
            self.cached = self.cached[0]  # [N, C]: one copy, the set itself
        self.teachers = []  # never run again: let their memory go

    def combined(self, logits):
        """The teachers' logits [..., C], one teacher's at a time, as what the student matches:
        their mean for logit_mse, else one teacher's log p or the ensemble's (combine_log_probs)."""
        if self.loss == "logit_mse":
            return mean_logits(logits)
        if self.loss == "kd":
            return combine_log_probs((soft_targets(v, self.T) for v in logits), self.combine)
        raise ValueError(f"unknown loss {self.loss!r}")

    def of(self, x):
        return self.combined([teacher_logits(t, x, self.batch_size) for t in self.teachers])

    def __call__(self, idx, xb, shifts=None):
        if self.per_batch:
            return self.of(xb)
        if self.max_shift == 0:
            if shifts is not None:  # the loop jitters a set whose targets were made unshifted
                raise ValueError("targets made for an unjittered transfer set were asked for shifted images")
            return self.cached[idx]
        if shifts is None:
            raise ValueError("a jittered transfer set's cached targets need each image's shift code")
        return self.cached[shifts, idx]

    def finite(self, x):
        """Whether the teachers' outputs are finite (on the first images of x when per batch)."""
        return bool(torch.isfinite(self.of(x[:1000]) if self.per_batch else self.cached).all())
