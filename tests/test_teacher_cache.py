"""The teachers' logits kept between runs (kd_cli/teacher_cache.py): a run that reuses a file
trains bit for bit as one that computed the logits; a file is reused only for the same teacher,
transfer set, shifts, chunking, threads and machine; a damaged or foreign file is computed again;
a folder that cannot be written costs only time; runs side by side take turns."""
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
import kd_cli
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


def test_an_ensemble_keeps_one_file_a_teacher_and_trains_as_without_them(kd, teacher, teacher_cache):
    kd("train-teacher", *TINY, "epochs=2", "seed=1", f"hydra.run.dir={kd.cwd / 'other'}")
    both = f"[{teacher},{kd.cwd / 'other' / 'checkpoint.pt'}]"
    first = distill(kd, "first", both, "teacher_combine=geometric")
    assert [t["reused"] for t in first["teacher_logits"]] == [False, False]
    assert len({t["file"] for t in first["teacher_logits"]}) == 2
    assert [t["reused"] for t in distill(kd, "reused", both, "teacher_combine=geometric")["teacher_logits"]] == [True, True]
    distill(kd, "computed", both, "teacher_combine=geometric", "teacher_cache=null")
    a, b = weights(kd, "reused"), weights(kd, "computed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_teacher_copied_over_the_same_path_is_not_taken_for_it(kd, teacher):
    distill(kd, "before", teacher)
    kd("train-teacher", *TINY, "epochs=2", "seed=1", f"hydra.run.dir={kd.cwd / 'other'}")
    shutil.copy(kd.cwd / "other" / "checkpoint.pt", teacher)
    assert distill(kd, "after", teacher)["teacher_logits"][0]["reused"] is False


def test_a_stopped_run_from_before_the_cache_existed_resumes(kd, teacher):
    """Its recorded config has no teacher_cache key; where logits are kept changes no result."""
    import signal

    from test_resume import signal_at

    stopped = kd.cwd / "stopped"
    args = ["distill", *TINY, f"teacher={teacher}", "T=3", *JITTERED, "batch_size=50", f"hydra.run.dir={stopped}"]
    assert kd(*args, extra_env=signal_at(signal.SIGINT, 3, 4), check=False).returncode == 128 + signal.SIGINT
    recorded = stopped / ".hydra" / "config.yaml"
    recorded.write_text("".join(line for line in recorded.read_text().splitlines(True) if not line.startswith("teacher_cache:")))
    kd("distill", f"resume={stopped}")
    kd(*args[:-1], f"hydra.run.dir={kd.cwd / 'untouched'}")
    a, b = weights(kd, "stopped"), weights(kd, "untouched")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cpu_is_named_by_its_model_and_instruction_sets_on_x86_and_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: sse avx2\ncpu MHz\t\t: 2000\n\n" \
          "processor\t: 1\n"
    assert teacher_cache.cpu_identity(x86) != teacher_cache.cpu_identity(x86.replace("avx2", "avx2 avx512_bf16"))
    assert teacher_cache.cpu_identity(x86) == teacher_cache.cpu_identity(x86.replace("2000", "3100"))  # clock: no
    arm = "processor\t: 0\nBogoMIPS\t: 50\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert teacher_cache.cpu_identity(arm) != teacher_cache.cpu_identity(arm.replace("0xd0c", "0xd40"))
    assert teacher_cache.cpu_identity(arm) != teacher_cache.cpu_identity(arm.replace("asimd", "asimd sve"))


@pytest.mark.parametrize("failure", [RuntimeError("unexpected pos 64"), OSError(28, "No space left on device"),
                                     KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_no_file_and_costs_only_time(tmp_path, monkeypatch, capsys, failure):
    what, logits = what_and_logits()
    path = teacher_cache.file_for(tmp_path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = path.with_name(path.name + ".4242.tmp")  # what a killed run's write left
    stale.write_bytes(b"half")

    def half_a_save(obj, f):
        Path(f).write_bytes(b"half a file")
        raise failure
    monkeypatch.setattr(torch, "save", half_a_save)
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            teacher_cache.cached_logits(tmp_path, what, "cpu", lambda: logits)
    else:
        got, file, reused = teacher_cache.cached_logits(tmp_path, what, "cpu", lambda: logits)
        assert torch.equal(got, logits) and file is None and reused is False
        assert "kd: warning: could not keep" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name + ".lock"]  # no file, no .tmp


def test_the_file_name_changes_with_everything_the_logits_depend_on(tmp_path, monkeypatch):
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
    with monkeypatch.context() as m:  # the kernels a library picks on this CPU
        m.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        names.add(teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100)))
    with monkeypatch.context() as m:  # another torch computes them with other kernels
        m.setattr(torch, "__version__", torch.__version__ + "+other")
        names.add(teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100)))
    with monkeypatch.context() as m:  # kd's own code that computes the logits (the model, the shifts)
        m.setattr(teacher_cache, "CODE", ("models.py", "data.py"))
        names.add(teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100)))
    assert base not in names and len(names) == len(others) + 4


def what_and_logits():
    x = torch.rand(6, 28, 28)
    return teacher_cache.identity("c" * 64, x, 0, 100), torch.randn(1, 6, 10)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "wrong shape", "float64"])
def test_a_damaged_or_foreign_file_is_computed_again_and_replaced(tmp_path, capsys, damage):
    what, logits = what_and_logits()
    path = teacher_cache.file_for(tmp_path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    if damage == "truncated":
        torch.save({"what": what, "logits": logits}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "foreign":
        torch.save({"what": {**what, "teacher_sha256": "d" * 64}, "logits": torch.zeros(1, 6, 10)}, path)
    elif damage == "wrong shape":
        torch.save({"what": what, "logits": torch.zeros(1, 5, 10)}, path)
    else:
        torch.save({"what": what, "logits": logits.double()}, path)
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
    """Two callers of the same file, as two jobs of a sweep: while the first computes, the second
    waits for it and then reads its file: the logits are computed once."""
    pytest.importorskip("fcntl")  # the lock is POSIX's
    what, logits = what_and_logits()
    computing, finish, calls, result = threading.Event(), threading.Event(), [], {}

    def first_compute():
        calls.append("first")
        computing.set()
        finish.wait(30)  # holds its turn until the test has seen the second caller arrive
        return logits

    def second_compute():
        calls.append("second")
        return torch.zeros(1, 6, 10)

    def caller(name, compute):
        result[name] = teacher_cache.cached_logits(tmp_path, what, "cpu", compute)
    first = threading.Thread(target=caller, args=("first", first_compute))
    first.start()
    assert computing.wait(30)
    second = threading.Thread(target=caller, args=("second", second_compute))
    second.start()
    waited, deadline = "", time.monotonic() + 30
    while "waiting for another run" not in waited and "second" not in calls and time.monotonic() < deadline:
        waited += capsys.readouterr().err
        time.sleep(0.01)
    finish.set()
    first.join(30)
    second.join(30)
    assert calls == ["first"], "the second caller computed instead of waiting for the first one's file"
    assert "waiting for another run" in waited
    logits_read, _, reused = result["second"]
    assert reused is True and torch.equal(logits_read, logits)


# an edit to any module whose code computes the logits renames the file (what happens, not the list)
@pytest.mark.parametrize("module", ["models.py", "data.py", "teachers.py"])
def test_the_file_name_changes_with_the_code_that_computes_the_logits(tmp_path, monkeypatch, module):
    pkg = tmp_path / "kd_cli"
    shutil.copytree(Path(kd_cli.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(teacher_cache, "__file__", str(pkg / "teacher_cache.py"))
    x = torch.rand(5, 28, 28)
    before = teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100))
    with open(pkg / module, "a") as f:
        f.write("\n# an edit\n")
    assert teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100)) != before


# every variable that steers the math libraries' kernels renames the file (written out, not read from the module)
@pytest.mark.parametrize("var", ["ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                 "MKL_CBWR", "MKL_DEBUG_CPU_TYPE"])
def test_the_file_name_changes_with_each_kernel_variable(tmp_path, monkeypatch, var):
    monkeypatch.delenv(var, raising=False)
    x = torch.rand(5, 28, 28)
    before = teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100))
    monkeypatch.setenv(var, "AVX2")
    assert teacher_cache.file_for(tmp_path, teacher_cache.identity("a" * 64, x, 1, 100)) != before
