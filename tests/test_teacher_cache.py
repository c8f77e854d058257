"""The teachers' logits kept between runs (kd_cli/teacher_cache.py): a run that reuses a file
trains bit for bit as one that computed the logits; a file is reused only for the same teacher,
transfer set, shifts, chunking, threads and machine; a damaged or foreign file is computed again;
a folder that cannot be written costs only time; runs side by side take turns."""
import json
import threading
import time

import pytest
import torch

from conftest import TINY
from kd_cli import teacher_cache
from kd_cli.checkpoint import load_checkpoint

JITTERED = ["data.jitter=1", "epochs=9"]  # 9 shifted copies, cached once a run is 9 epochs long


@pytest.fixture
def teacher(kd):
    kd("train-teacher", *TINY, "epochs=2", f"hydra.run.dir={kd.cwd / 'teacher'}")
    return kd.cwd / "teacher" / "checkpoint.pt"


def distill(kd, name, teacher, *args):
    kd("distill", *TINY, f"teacher={teacher}", "T=3", *JITTERED, *args, f"hydra.run.dir={kd.cwd / name}")
    return json.loads((kd.cwd / name / "metrics.json").read_text())


def weights(kd, name):
    return load_checkpoint(kd.cwd / name / "checkpoint.pt")["state_dict"]


def test_a_second_run_reuses_the_logits_and_trains_bit_for_bit_as_one_that_computes_them(kd, teacher, teacher_cache):
    first = distill(kd, "first", teacher)
    assert first["teacher_logits"][0]["reused"] is False
    kept = sorted(teacher_cache.glob("teacher-logits-*.pt"))
    assert [str(p) for p in kept] == [first["teacher_logits"][0]["file"]]
    again = distill(kd, "again", teacher, "T=7", "alpha=0.5")  # a sweep's other job: the same logits
    assert again["teacher_logits"] == [{"file": str(kept[0]), "reused": True}]
    reused = distill(kd, "reused", teacher)
    computed = distill(kd, "computed", teacher, "teacher_cache=null")
    assert reused["teacher_logits"][0]["reused"] is True and computed["teacher_logits"] is None
    assert sorted(teacher_cache.glob("teacher-logits-*.pt")) == kept
    a, b = weights(kd, "reused"), weights(kd, "computed")
    assert all(torch.equal(a[k], b[k]) for k in a) and reused["history"] == computed["history"]


def test_another_transfer_set_or_teacher_computes_its_own(kd, teacher, teacher_cache):
    distill(kd, "all", teacher)
    assert distill(kd, "no3", teacher, "data.transfer.exclude=[3]")["teacher_logits"][0]["reused"] is False
    assert distill(kd, "unjittered", teacher, "data.jitter=0")["teacher_logits"][0]["reused"] is False
    kd("train-teacher", *TINY, "epochs=2", "seed=1", f"hydra.run.dir={kd.cwd / 'other'}")
    assert distill(kd, "other-teacher", kd.cwd / "other" / "checkpoint.pt")["teacher_logits"][0]["reused"] is False
    assert len(list(teacher_cache.glob("teacher-logits-*.pt"))) == 4


def test_the_file_name_changes_with_everything_the_logits_depend_on(tmp_path):
    x = torch.rand(50, 28, 28)
    base = teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100))
    assert base == teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x.clone(), 1, 100))
    moved = x.clone()
    moved[7, 3, 3] += 1e-6
    others = [("b" * 64, x, 1, 100), ("a" * 64, moved, 1, 100), ("a" * 64, x[:49], 1, 100),
              ("a" * 64, x, 2, 100), ("a" * 64, x, 1, 10)]
    names = {teacher_cache.file_for(tmp_path, teacher_cache.identity(*o)) for o in others}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # float rounding may follow the thread count
        names.add(teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100)))
    finally:
        torch.set_num_threads(threads)
    assert base not in names and len(names) == len(others) + 1


def what_and_logits():
    x = torch.rand(6, 28, 28)
    return teacher_cache.identity("c" * 64, x, 0, 100), torch.randn(1, 6, 10)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "wrong shape"])
def test_a_damaged_or_foreign_file_is_computed_again_and_replaced(tmp_path, capsys, damage):
    what, logits = what_and_logits()
    path = teacher_cache.file_for(tmp_path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    if damage == "truncated":
        torch.save({"what": what, "logits": logits}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "foreign":
        torch.save({"what": {**what, "teacher_sha256": "d" * 64}, "logits": torch.zeros(1, 6, 10)}, path)
    else:
        torch.save({"what": what, "logits": torch.zeros(1, 5, 10)}, path)
    calls = []
    got, file, reused = teacher_cache.cached_logits(tmp_path, what, "cpu", lambda: calls.append(1) or logits)
    assert calls == [1] and reused is False and file == path and torch.equal(got, logits)
    assert "kd: warning:" in capsys.readouterr().err
    got, _, reused = teacher_cache.cached_logits(tmp_path, what, "cpu", lambda: calls.append(2) or logits)
    assert calls == [1] and reused is True and torch.equal(got, logits)


def test_a_cache_folder_that_cannot_be_made_costs_only_time(kd, teacher, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = kd("distill", *TINY, f"teacher={teacher}", "T=3", *JITTERED, f"teacher_cache={blocker / 'cache'}",
             f"hydra.run.dir={kd.cwd / 'run'}")
    assert "kd: warning: cannot use the teacher cache" in run.stderr
    assert json.loads((kd.cwd / "run" / "metrics.json").read_text())["teacher_logits"] == [{"file": None, "reused": False}]


def test_runs_side_by_side_take_turns_the_second_reuses_what_the_first_computed(tmp_path, capsys):
    """The test holds the lock as a run computing the logits would; a second caller must wait for
    it and then read the file instead of computing its own."""
    fcntl = pytest.importorskip("fcntl")
    what, logits = what_and_logits()
    path = teacher_cache.file_for(tmp_path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = open(path.with_name(path.name + ".lock"), "a")
    fcntl.flock(first, fcntl.LOCK_EX)
    result, calls = {}, []

    def second_run():
        got = teacher_cache.cached_logits(tmp_path, what, "cpu", lambda: calls.append(1) or torch.zeros(1, 6, 10))
        result.update(zip(("logits", "file", "reused"), got))
    second = threading.Thread(target=second_run)
    second.start()
    waited, deadline = "", time.monotonic() + 30
    while "waiting for another run" not in waited and time.monotonic() < deadline and second.is_alive():
        waited += capsys.readouterr().err
        time.sleep(0.01)
    assert "waiting for another run" in waited, "the second caller did not wait for the lock"
    torch.save({"what": what, "logits": logits}, path)  # what the first run keeps, then it lets go
    first.close()
    second.join(30)
    assert calls == [] and result["reused"] is True and torch.equal(result["logits"], logits)
