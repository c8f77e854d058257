"""The teachers' logits over a transfer set, kept on disk for the runs that come after: the jobs
of a T or alpha sweep, or the seeds of one recipe, run a teacher over the transfer set once
between them instead of once each (in the jittered default recipe that is 25 passes over 60,000
images, about 100 s at one thread). A file is named by everything its numbers depend on, down to
the thread count and the processor, so that a run that reuses one trains bit for bit as if it had
computed the logits itself; a file that does not load, or was made for something else, is
computed again. Runs side by side that need the same file take turns: one computes it while the
others wait for it."""
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

FORMAT = 1  # bump when what a file holds changes: older files are then never matched


def hardware(device):
    """What the float rounding of a matrix multiply depends on besides the code: the GPU, or the
    CPU's model and its instruction sets (a library picks its kernels by them)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    return " ".join(fields.get(k, "").strip() for k in ("vendor_id", "cpu family", "model", "model name", "flags"))


def identity(teacher_sha256, x, max_shift, batch_size):
    """Everything a teacher's logits over x (shifted_logits) depend on, as a dict."""
    images = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"format": FORMAT, "teacher_sha256": teacher_sha256, "images_sha256": images,
            "images_shape": list(x.shape), "max_shift": int(max_shift), "batch_size": int(batch_size),
            "device": x.device.type, "hardware": hardware(x.device), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__)}


def file_for(folder, what):
    name = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    return Path(os.path.expanduser(str(folder))) / f"teacher-logits-{name}.pt"


def _warn(message):
    print(f"kd: warning: {message}", file=sys.stderr, flush=True)


def _load(path, what, device):
    """The logits a file holds if it was made for `what`; None if there is no such file."""
    if not path.is_file():
        return None
    try:
        held = torch.load(path, map_location=device, weights_only=True)
        copies = (2 * what["max_shift"] + 1) ** 2
        if held["what"] == what and held["logits"].dtype == torch.float32 \
                and list(held["logits"].shape[:2]) == [copies, what["images_shape"][0]]:
            return held["logits"]
        _warn(f"{path} was made for other logits; computing them again")
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file is recomputed, never trusted
        _warn(f"{path} does not load ({type(e).__name__}); computing the logits again")
    return None


def _lock(path):
    """An exclusive lock beside `path`, held until the returned file is closed (or the process
    ends); None where locks are not available."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs side by side may both compute (each gets the same numbers)
        return None
    f = open(path.with_name(path.name + ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"kd: waiting for another run to finish the teacher's logits ({path.name})", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def cached_logits(folder, what, device, compute):
    """(logits, path, reused): those of the file for `what` in `folder`, or compute() kept there.
    A folder that cannot be written costs only the time: the logits are computed and a warning
    says why they were not kept."""
    path = file_for(folder, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
    except OSError as e:
        _warn(f"cannot use the teacher cache {path.parent} ({e.strerror}); computing the teacher's logits "
              "without keeping them (set teacher_cache= or KD_CACHE_DIR to a writable folder)")
        return compute(), None, False
    try:
        held = _load(path, what, device)
        if held is not None:
            return held, path, True
        logits = compute()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"what": what, "logits": logits.cpu()}, tmp)
            os.replace(tmp, path)  # whole or absent: a reader never sees half a file
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if not isinstance(e, OSError):
                raise
            _warn(f"could not keep the teacher's logits in {path} ({e.strerror}); this run goes on without")
            return logits, None, False
        return logits, path, False
    finally:
        if lock is not None:
            lock.close()


def logits_source(folder, teacher_shas, x, max_shift, batch_size):
    """(logits_of for SoftTargets, the list it fills with each teacher's file and whether it was
    reused): the teachers' logits over x from `folder`, or computed as ever when folder is None."""
    from .teachers import shifted_logits

    kept = []

    def logits_of(i, teacher):
        def compute():
            return shifted_logits(teacher, x, max_shift, batch_size)
        if folder is None:
            return compute()
        what = identity(teacher_shas[i], x, max_shift, batch_size)
        logits, path, reused = cached_logits(folder, what, x.device, compute)
        kept.append({"file": None if path is None else str(path), "reused": reused})
        return logits
    return logits_of, kept
