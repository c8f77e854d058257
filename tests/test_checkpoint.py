"""Checkpoints: atomic writes and safe, checked loading."""
import os
import pickle

import pytest
import torch

from kd_cli.checkpoint import FORMAT_VERSION, load_checkpoint, newest_checkpoint, save_checkpoint
from kd_cli.errors import KDError

from conftest import plain_logits


def payload():
    return {"stage": "train-student", "arch": {"hidden": [4], "in_features": 784, "out_features": 10},
            "state_dict": {"w": torch.ones(2, 2)}, "config": {"T": 2.0}, "metrics": {"test_errors": 3}}


def test_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload())
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and torch.equal(ckpt["state_dict"]["w"], torch.ones(2, 2))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload())
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {**payload(), "bad": lambda: 0})  # unpicklable: the write fails midway
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, payload())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(KDError, match="truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(1)}, foreign)
    with pytest.raises(KDError, match="missing format_version, stage, arch, state_dict"):
        load_checkpoint(foreign)
    for version in (FORMAT_VERSION + 1, FORMAT_VERSION - 1):
        other = tmp_path / f"format{version}.pt"
        torch.save({**payload(), "format_version": version}, other)
        with pytest.raises(KDError, match=f"format {version}"):
            load_checkpoint(other)
    # stray bytes make torch's readers fail in their own ways (KeyError, IndexError, ...)
    for name, data in (("text.pt", b"hello world"), ("config.yaml", b"epochs: 3\n"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KDError, match="not a readable kd checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(KDError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({**payload(), "x": Exploit()}, evil)
    with pytest.raises(KDError, match="nothing in it was run"):
        load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a bare pickle, not even a torch zip
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(KDError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_newest_checkpoint_covers_runs_and_sweeps(tmp_path):
    assert newest_checkpoint(tmp_path, "train-teacher") is None
    a = tmp_path / "train-teacher" / "a" / "checkpoint.pt"
    b = tmp_path / "train-teacher-sweep" / "s" / "0_x" / "checkpoint.pt"
    for p, t in ((a, 100), (b, 200)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (t, t))
    assert newest_checkpoint(tmp_path, "train-teacher") == b


def test_pretrained_is_the_shipped_teacher_checked_by_its_sha256(kd, tmp_path, monkeypatch):
    import hashlib
    import json
    import shutil

    import kd_cli.checkpoint

    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'teacher'}")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(kd_cli.checkpoint, "pretrained_folder", lambda: shipped)
    refused = kd("evaluate", "checkpoint=pretrained", check=False)  # nothing shipped yet
    assert refused.returncode == 2 and "no pretrained teacher ships" in refused.stderr

    shutil.copy(tmp_path / "teacher" / "checkpoint.pt", shipped / "teacher.pt")
    digest = hashlib.sha256((shipped / "teacher.pt").read_bytes()).hexdigest()
    (shipped / "teacher.sha256").write_text(f"{digest}  teacher.pt\n")
    kd("evaluate", "checkpoint=pretrained", f"hydra.run.dir={tmp_path / 'eval'}")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert metrics["test_errors"] == trained["test_errors"] and metrics["checkpoint"] == str(shipped / "teacher.pt")
    kd("distill", "teacher=pretrained", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'student'}")
    student = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert student["teacher"]["sha256"] == digest

    damaged = bytearray((shipped / "teacher.pt").read_bytes())
    damaged[-1] ^= 1
    (shipped / "teacher.pt").write_bytes(bytes(damaged))
    refused = kd("distill", "teacher=pretrained", "model.hidden=[16]", "epochs=1", check=False)
    assert refused.returncode == 2 and "does not match its sha256" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def shipped_teacher():
    """pretrained/ and its teacher.json, or a skip where this copy ships none."""
    import json

    from kd_cli.checkpoint import pretrained_folder

    shipped = pretrained_folder()
    if not (shipped / "teacher.pt").exists():
        pytest.skip("no teacher ships with this copy")
    return shipped, json.loads((shipped / "teacher.json").read_text())


def test_the_shipped_teacher_is_what_its_record_says():
    """pretrained/ as committed: teacher.pt has the digest teacher.sha256 and teacher.json record
    (computed here with hashlib) and is the paper's float32 784-1200-1200-10."""
    import hashlib

    shipped, record = shipped_teacher()
    digest = hashlib.sha256((shipped / "teacher.pt").read_bytes()).hexdigest()
    assert (shipped / "teacher.sha256").read_text().split()[0] == digest == record["sha256"]
    ckpt = load_checkpoint(shipped / "teacher.pt")
    assert ckpt["stage"] == "train-teacher" and ckpt["arch"]["hidden"] == [1200, 1200]
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
    assert ckpt["metrics"]["test_errors"] == record["test_errors"]


def test_the_shipped_teacher_makes_the_errors_its_record_says():
    """Where the real MNIST is at hand ($KD_DATA_ROOT): exactly the test errors teacher.json claims,
    counted here by a plain forward of its weights."""
    from kd_cli.data import load_data

    shipped, record = shipped_teacher()
    root = os.environ.get("KD_DATA_ROOT")
    if not root or not os.path.isdir(os.path.join(root, "MNIST", "raw")):
        pytest.skip("the real MNIST is not at $KD_DATA_ROOT")
    _, _, x, y = load_data(root, download=False, device=torch.device("cpu"))
    logits = plain_logits(shipped / "teacher.pt", x)
    assert int((logits.argmax(1) != y).sum()) == record["test_errors"]
