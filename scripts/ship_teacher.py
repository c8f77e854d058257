"""Make a finished teacher run the one kd ships (`teacher=pretrained`, `kd evaluate checkpoint=pretrained`).

    python scripts/ship_teacher.py outputs/train-teacher-sweep/<stamp>/0_seed=0 --commit <sha of the code that trained it>

Writes into pretrained/ (or --into): teacher.pt (the run's checkpoint.pt, byte for byte),
teacher.sha256 (checked by kd on every use), teacher.json (its metrics, the command, the commit)
and README.md (the same, for people). Refused, with nothing written, when the run is not a
finished train-teacher run on the whole training set, when its weights are not float32, or when
a shipped teacher exists and the new one is not better on the test set: the issue that asked for
a shipped teacher allows one commit of it, replaced only by a better one.
"""
import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
import yaml

from kd_cli.checkpoint import load_checkpoint, sha256_of
from kd_cli.errors import KDError

ROOT = Path(__file__).resolve().parents[1]


def command_of(run):
    """The kd command that made `run` (a single run's overrides; a sweep job's own overrides)."""
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    return shlex.join(["kd", "train-teacher", *[o for o in overrides if not o.startswith("hydra.")]])


def refusal(run, into):
    """Why `run` cannot be shipped into `into` (None when it can)."""
    if not (run / "metrics.json").is_file() or not (run / "checkpoint.pt").is_file():
        return f"{run} is not a finished run (no metrics.json or checkpoint.pt)"
    try:
        ckpt = load_checkpoint(run / "checkpoint.pt")
    except KDError as e:
        return str(e)
    config = ckpt.get("config") or {}
    if ckpt.get("stage") != "train-teacher":
        return f"{run} is a {ckpt.get('stage')} run, not train-teacher"
    data = config.get("data", {})
    if data.get("train_limit") is not None or data.get("val_size", 0) != 0:
        return f"{run} was trained on part of the training set (data.train_limit or data.val_size set)"
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in ckpt["state_dict"].values()):
        return f"{run}'s weights are not float32"
    shipped = into / "teacher.json"
    if shipped.is_file():
        before = json.loads(shipped.read_text())["test_errors"]
        if json.loads((run / "metrics.json").read_text())["test_errors"] >= before:
            return f"the shipped teacher has {before} test errors and {run} is not better; nothing replaced"
    return None


def ship(run, into, commit, note=""):
    run, into = Path(run).resolve(), Path(into)
    why = refusal(run, into)
    if why:
        raise SystemExit(f"ship_teacher: error: {why}")
    metrics = json.loads((run / "metrics.json").read_text())
    digest = sha256_of(run / "checkpoint.pt")
    record = {"command": command_of(run), "commit": commit, "sha256": digest, "note": note,
              **{k: metrics[k] for k in ("test_errors", "test_total", "per_class_errors", "epochs",
                                         "train_images", "train_seconds", "seed", "device", "precision", "arch")}}
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "checkpoint.pt", into / "teacher.pt")
    (into / "teacher.sha256").write_text(f"{digest}  teacher.pt\n")
    (into / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    (into / "README.md").write_text(
        "# The teacher shipped with kd\n\n"
        "`kd distill teacher=pretrained` distills from it; `kd evaluate checkpoint=pretrained` counts its "
        "errors again. kd checks `teacher.pt` against `teacher.sha256` on every use.\n\n"
        f"- **{record['test_errors']} test errors** of {record['test_total']} (per class 0-9: "
        f"{', '.join(map(str, record['per_class_errors']))})\n"
        f"- trained by `KD_DATA_ROOT=<data> {record['command']}` with the code of commit {commit}, "
        f"{record['epochs']} epochs on {record['train_images']:,} images, {record['precision']} on "
        f"{record['device']}, {record['train_seconds']:.0f} s of training\n"
        f"- sha256 {digest}\n" + (f"\n{note}\n" if note else ""))
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished kd train-teacher run folder")
    ap.add_argument("--commit", required=True, help="the commit whose code trained the run")
    ap.add_argument("--note", default="", help="a paragraph for README.md (e.g. the other seeds' errors, the machine)")
    ap.add_argument("--into", default=str(ROOT / "pretrained"), help="the folder to write (default pretrained/)")
    args = ap.parse_args()
    record = ship(args.run, args.into, args.commit, args.note)
    print(f"shipped {record['test_errors']} test errors ({record['command']}) into {args.into}", file=sys.stderr)


if __name__ == "__main__":
    main()
