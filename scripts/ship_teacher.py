"""Make a finished teacher run the one kd ships (`teacher=pretrained`, `kd evaluate checkpoint=pretrained`).

    python scripts/ship_teacher.py outputs/train-teacher-sweep/<stamp>/0_seed=0 --commit <sha> --machine "<cpu, threads>"

Writes into pretrained/ (or --into): teacher.pt (the run's checkpoint.pt, byte for byte),
teacher.sha256 (checked by kd on every use), teacher.json (its metrics, the command, the commit,
the machine) and README.md (the same, for people). Refused, with nothing written, unless the run
is a finished train-teacher run of the paper's 784-1200-1200-10 on all of MNIST's training set,
with finite float32 weights whose checkpoint carries the same metrics as its metrics.json; and
refused when a teacher is shipped already and the new one is not better on the test set (the issue
that asked for a shipped teacher allows one commit of it, replaced only by a better one).
"""
import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from kd_cli.checkpoint import check_model, load_checkpoint, sha256_of, write_atomically
from kd_cli.errors import KDError

ROOT = Path(__file__).resolve().parents[1]
PAPER_TEACHER = {"in_features": 784, "hidden": [1200, 1200], "out_features": 10}
WHOLE_SET = {"name": "mnist", "train_limit": None, "val_size": 0,
             "transfer": {"exclude": [], "include": None, "fraction": 1.0}}


def command_of(run):
    """The kd command that trains `run` again from scratch: its own overrides, without resume=, and
    the precision it ran in when it did not name one (precision=auto settles by machine)."""
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    keep = [o for o in overrides if not o.split("=")[0] in ("resume", "+resume")]
    if not any(o.split("=")[0] == "precision" for o in keep):
        keep.append(f"precision={json.loads((run / 'metrics.json').read_text())['precision']}")
    return shlex.join(["kd", "train-teacher", *keep])


def refusal(run, into, paper_arch=True):
    """Why `run` cannot be shipped into `into` (None when it can)."""
    if not (run / "metrics.json").is_file() or not (run / "checkpoint.pt").is_file():
        return f"{run} is not a finished run (no metrics.json or checkpoint.pt)"
    try:
        ckpt = check_model(load_checkpoint(run / "checkpoint.pt"), run / "checkpoint.pt")
    except KDError as e:
        return str(e)
    metrics = json.loads((run / "metrics.json").read_text())
    if ckpt.get("stage") != "train-teacher":
        return f"{run} is a {ckpt.get('stage')} run, not train-teacher"
    if ckpt.get("metrics") != metrics:
        return f"{run}/checkpoint.pt carries other metrics than {run}/metrics.json: not the same run"
    data = (ckpt.get("config") or {}).get("data") or {}
    if any(data.get(k) != v for k, v in WHOLE_SET.items() if k != "transfer") or \
            any((data.get("transfer") or {}).get(k) != v for k, v in WHOLE_SET["transfer"].items()):
        return f"{run} was not trained on all of MNIST's training set (data.name, train_limit, val_size or transfer set)"
    if paper_arch and any(ckpt["arch"].get(k) != v for k, v in PAPER_TEACHER.items()):
        return f"{run} is not the paper's 784-1200-1200-10 teacher ({ckpt['arch']})"
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in ckpt["state_dict"].values()):
        return f"{run}'s weights are not float32"
    if (into / "teacher.pt").exists():
        try:
            shipped = json.loads((into / "teacher.json").read_text())
            consistent = shipped["sha256"] == sha256_of(into / "teacher.pt")
        except (OSError, ValueError, KeyError):
            consistent = False
        if not consistent:
            return f"{into}/teacher.pt has no matching teacher.json: restore the folder with git first"
        if shipped["test_total"] != metrics["test_total"] or metrics["test_errors"] >= shipped["test_errors"]:
            return (f"the shipped teacher has {shipped['test_errors']} test errors of {shipped['test_total']} and "
                    f"{run} ({metrics['test_errors']} of {metrics['test_total']}) is not better; nothing replaced")
    return None


def ship(run, into, commit, machine, note="", paper_arch=True):
    run, into = Path(run).resolve(), Path(into)
    why = refusal(run, into, paper_arch)
    if why:
        raise SystemExit(f"ship_teacher: error: {why}")
    metrics = json.loads((run / "metrics.json").read_text())
    digest = sha256_of(run / "checkpoint.pt")
    record = {"command": command_of(run), "commit": commit, "machine": machine, "sha256": digest, "note": note,
              **{k: metrics[k] for k in ("test_errors", "test_total", "per_class_errors", "epochs",
                                         "train_images", "train_seconds", "seed", "device", "precision", "arch")}}
    readme = (
        "# The teacher shipped with kd\n\n"
        "`kd distill teacher=pretrained` distills from it; `kd evaluate checkpoint=pretrained` counts its "
        "errors again. kd checks `teacher.pt` against `teacher.sha256` on every use.\n\n"
        f"- **{record['test_errors']} test errors** of {record['test_total']} (per class 0-9: "
        f"{', '.join(map(str, record['per_class_errors']))})\n"
        f"- trained by `KD_DATA_ROOT=<data> {record['command']}` with the code of commit {commit}, "
        f"{record['epochs']} epochs on {record['train_images']:,} images, {record['precision']} on "
        f"{machine}, {record['train_seconds']:.0f} s of training\n"
        f"- sha256 {digest}\n" + (f"\n{note}\n" if note else ""))
    into.mkdir(parents=True, exist_ok=True)
    # Each file lands whole (written aside, then renamed); teacher.pt first and teacher.json last,
    # so a crash in between leaves a folder that kd (sha256) and this script (teacher.json) refuse.
    with tempfile.TemporaryDirectory(dir=into) as staging:
        checkpoint = Path(staging) / "teacher.pt"
        checkpoint.write_bytes((run / "checkpoint.pt").read_bytes())
        if sha256_of(checkpoint) != digest:
            raise SystemExit(f"ship_teacher: error: {run}/checkpoint.pt changed while it was copied")
        checkpoint.replace(into / "teacher.pt")
    for name, text in (("teacher.sha256", f"{digest}  teacher.pt\n"), ("README.md", readme),
                       ("teacher.json", json.dumps(record, indent=2) + "\n")):
        write_atomically(into / name, lambda f, text=text: f.write(text.encode()))
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished kd train-teacher run folder")
    ap.add_argument("--commit", required=True, help="the commit whose code trained the run")
    ap.add_argument("--machine", required=True, help="where it trained (CPU model, cores; or the GPU)")
    ap.add_argument("--note", default="", help="a paragraph for README.md (e.g. the other seeds' errors)")
    ap.add_argument("--into", default=str(ROOT / "pretrained"), help="the folder to write (default pretrained/)")
    args = ap.parse_args()
    record = ship(args.run, args.into, args.commit, args.machine, args.note)
    print(f"shipped {record['test_errors']} test errors ({record['command']}) into {args.into}", file=sys.stderr)


if __name__ == "__main__":
    main()
