"""The teachers' logits over a transfer set, kept on disk for the runs that come after: the jobs
of a T or alpha sweep, or the seeds of one recipe, run a teacher over the transfer set once
between them instead of once each (in the jittered default recipe that is 25 passes over 60,000
images, about 90 s at one thread). A file is named by everything its numbers depend on, down to
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

from .data import shift_codes
from .prepare import cpuinfo, first_processor

FORMAT = 1  # bump when what a file holds changes: older files are then never matched


# the modules whose code computes the logits: the model, the shifts, the teachers' passes
CODE = ("models.py", "data.py", "teachers.py")
# /proc/cpuinfo fields that name a CPU and its instruction sets (x86, then ARM)
CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags",
              "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "CPU revision", "Features")
# environment variables that change which kernels the math libraries pick on the same CPU
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE")


def cpu_identity(text):
    """The CPU as /proc/cpuinfo's first processor names it: model and instruction sets."""
    fields = first_processor(text)
    return "; ".join(f"{k}={fields[k]}" for k in CPU_FIELDS if k in fields)


def hardware(device):
    """What the float rounding of a matrix multiply depends on besides kd's code and torch: the
    GPU and its TF32 settings, or the CPU's model, its instruction sets and the kernels torch and
    its libraries choose on it."""
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
                f" tf32={torch.backends.cuda.matmul.allow_tf32},{torch.backends.cudnn.allow_tf32}"
                f" matmul={torch.get_float32_matmul_precision()}")
    cpu = cpu_identity(cpuinfo())
    env = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ)
    # not platform.processor(): it runs `uname -p` in a subprocess and names nothing cpuinfo does not
    return f"{platform.machine()} {cpu} aten={torch.backends.cpu.get_cpu_capability()} {env}".strip()


def code_sha256():
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in CODE)).hexdigest()


def images_sha256(x):
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def identity(teacher_sha256, x, max_shift, batch_size, images=None):
    """Everything a teacher's logits over x (shifted_logits) depend on, as a dict (`images`: x's
    images_sha256, when the caller has it already)."""
    return {"format": FORMAT, "teacher_sha256": teacher_sha256, "images_sha256": images or images_sha256(x),
            "images_shape": list(x.shape), "max_shift": int(max_shift), "batch_size": int(batch_size),
            "device": x.device.type, "hardware": hardware(x.device), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "code_sha256": code_sha256()}


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
        if held["what"] == what and held["logits"].dtype == torch.float32 \
                and list(held["logits"].shape[:2]) == [shift_codes(what["max_shift"]), what["images_shape"][0]]:
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
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kd: waiting for another run to finish the teacher's logits ({path.name})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
    except BaseException:
        f.close()
        raise
    return f


def _keep(path, what, logits):
    """Write the file whole or not at all; True when it was kept. Any failure to write (a full disk,
    the folder deleted meanwhile) costs only the time; an interruption leaves no partial file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"what": what, "logits": logits.cpu()}, tmp)
        os.replace(tmp, path)  # whole or absent: a reader never sees half a file
        return True
    except Exception as e:  # noqa: BLE001 -- torch.save reports a full disk as RuntimeError
        _warn(f"could not keep the teacher's logits in {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "this run goes on without")
        return False
    finally:
        tmp.unlink(missing_ok=True)


def cached_logits(folder, what, device, compute):
    """(logits, path, reused): those of the file for `what` in `folder`, or compute() kept there
    (path None when it could not be). A folder that cannot be made or written costs only the time:
    the logits are computed and a warning says why they were not kept."""
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
        for stale in path.parent.glob(f"{path.name}.*.tmp"):  # a killed run's; the lock says none is live
            stale.unlink(missing_ok=True)
        logits = compute()
        return logits, (path if _keep(path, what, logits) else None), False
    finally:
        if lock is not None:
            lock.close()


def logits_source(folder, teacher_shas, x, max_shift, batch_size):
    """(logits_of for SoftTargets, the list it fills with each teacher's file and whether it was
    reused): the teachers' logits over x from `folder`, or computed as ever when folder is None."""
    from .teachers import shifted_logits

    kept, images = [], []

    def logits_of(i, teacher):
        def compute():
            return shifted_logits(teacher, x, max_shift, batch_size)
        if folder is None:
            return compute()
        images[:] = images or [images_sha256(x)]  # hashed once for every teacher of an ensemble
        what = identity(teacher_shas[i], x, max_shift, batch_size, images[0])
        logits, path, reused = cached_logits(folder, what, x.device, compute)
        kept.append({"file": None if path is None else str(path), "reused": reused})
        return logits
    return logits_of, kept
