"""Runs that survive: Ctrl-C, SIGTERM or kill -9 at a chosen batch, resume, and end bit for bit
where an untouched run ends. The run signals itself at the chosen batch (KD_TEST_SIGNAL_AT), so
no test waits a guessed time."""
import errno
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from kd_cli.checkpoint import load_checkpoint, save_checkpoint
from kd_cli.errors import KDError

from conftest import KD, run_in_process

# a teacher: dropout, max-norm and jitter all draw from the RNG that resume must restore;
# 600 images / batch 50 = 12 batches an epoch
EPOCHS = 4
RUN = ["train-teacher", "model.hidden=[16]", f"epochs={EPOCHS}", "batch_size=50"]


def signal_at(sig, epoch, batch):
    return {"KD_TEST_SIGNAL_AT": f"{signal.Signals(sig).name}@{epoch}:{batch}"}


def assert_same_run(a, b):
    wa = load_checkpoint(a / "checkpoint.pt")["state_dict"]
    wb = load_checkpoint(b / "checkpoint.pt")["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["test_errors"] == mb["test_errors"] and ma["history"] == mb["history"]
    assert not (a / "state.pt").exists()  # a finished run keeps only its checkpoint


@pytest.fixture(scope="module")
def untouched(tmp_path_factory, tiny_root):
    cwd = tmp_path_factory.mktemp("untouched")
    proc = run_in_process([*RUN, f"hydra.run.dir={cwd / 'run'}"], cwd, {"KD_DATA_ROOT": str(tiny_root)})
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


# mid-epoch, at an epoch's first batch (its shuffle already drawn), at an epoch's last batch
@pytest.mark.parametrize("sig, epoch, batch", [(signal.SIGINT, 2, 7), (signal.SIGTERM, 3, 0), (signal.SIGINT, 1, 11),
                                               (signal.SIGTERM, 2, 7)])
def test_a_stop_at_any_batch_saves_there_and_resumes_to_the_untouched_run(kd, untouched, sig, epoch, batch):
    run_dir = kd.cwd / "stopped"
    proc = kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(sig, epoch, batch), check=False)
    assert proc.returncode == 128 + sig, proc.stderr
    assert f"epoch {epoch}, batch {batch}" in proc.stderr and f"resume={run_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoint.pt").exists()
    state = load_checkpoint(run_dir / "state.pt")
    assert (state["epoch"], state["step"]) == (epoch - 1, batch)  # saved at the very batch
    resumed = kd(RUN[0], f"resume={run_dir}")
    assert resumed.stdout.strip().splitlines()[-1].startswith("test errors: ")
    assert_same_run(run_dir, untouched)


def test_a_resumed_run_reports_the_wall_time_and_invocations_of_the_whole_run(kd, untouched):
    """wall_seconds of a resumed run adds the earlier invocations' (the state carries them), so a
    run continued across sessions does not report its last part as its time."""
    run_dir = kd.cwd / "timed"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    state = load_checkpoint(run_dir / "state.pt")
    assert state["invocations"] == 1 and not state["wall_seconds_partial"]
    # wall time, not training time: it also holds the per-epoch evaluations and the data loading
    assert state["train_seconds"] < state["earlier_wall_seconds"] < 600
    earlier = 10_000.0  # as if the first invocation had run for hours: no real run is this slow
    save_checkpoint(run_dir / "state.pt", {**state, "earlier_wall_seconds": earlier})
    started = time.perf_counter()
    kd(RUN[0], f"resume={run_dir}")
    took = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["invocations"] == 2 and earlier < metrics["wall_seconds"] <= earlier + took
    assert "wall_seconds_partial" not in metrics
    assert json.loads((untouched / "metrics.json").read_text())["invocations"] == 1


def test_a_state_from_before_wall_time_bookkeeping_resumes_with_its_wall_time_marked_partial(kd):
    run_dir = kd.cwd / "old-state"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    state = load_checkpoint(run_dir / "state.pt")
    old = {k: v for k, v in state.items() if k not in ("earlier_wall_seconds", "invocations", "wall_seconds_partial")}
    save_checkpoint(run_dir / "state.pt", old)
    kd(RUN[0], f"resume={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["invocations"] == 2 and metrics["wall_seconds_partial"] is True


@pytest.mark.subprocess
def test_kill_9_at_a_batch_restarts_from_the_last_finished_epoch(kd, untouched):
    run_dir = kd.cwd / "killed"
    proc = kd.process(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGKILL, 3, 5), check=False)
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "checkpoint.pt").exists()
    state = load_checkpoint(run_dir / "state.pt")  # whole: written to a temporary file, then renamed
    assert (state["epoch"], state["step"]) == (2, 0)  # the end of epoch 2, the last one finished
    kd(RUN[0], f"resume={run_dir}")
    assert_same_run(run_dir, untouched)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_stopped_cuda_run_resumes_to_the_untouched_cuda_run(kd):
    """On a GPU, state.pt is loaded onto the GPU, RNG states included, and torch takes RNG states
    only as CPU tensors: resuming must still restore both generators and end bit for bit."""
    on_gpu = [*RUN, "device=cuda"]
    kd(*on_gpu, f"hydra.run.dir={kd.cwd / 'untouched'}")
    proc = kd(*on_gpu, f"hydra.run.dir={kd.cwd / 'stopped'}", extra_env=signal_at(signal.SIGTERM, 2, 7), check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    kd(RUN[0], f"resume={kd.cwd / 'stopped'}")
    assert_same_run(kd.cwd / "stopped", kd.cwd / "untouched")
    assert json.loads((kd.cwd / "stopped" / "metrics.json").read_text())["device"].startswith("cuda")



@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a GPU appearing on a machine without one")
def test_resume_refuses_another_kind_of_device_and_leaves_the_run_as_it_was(kd, monkeypatch):
    """device=auto settles where the run resumes: a CPU run resumed on a machine with a GPU could not
    restore a CUDA generator it never had, and a GPU run resumed on a CPU would draw the rest of its
    shuffles, jitter and dropout from another generator. Both are refused, saying what to do."""
    folder = kd.cwd / "stopped"
    proc = kd(*RUN, f"hydra.run.dir={folder}", extra_env=signal_at(signal.SIGTERM, 2, 7), check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    with monkeypatch.context() as m:  # a GPU appears: auto would now pick it
        m.setattr(torch.cuda, "is_available", lambda: True)
        proc = kd(RUN[0], f"resume={folder}", check=False)
    assert proc.returncode == 2 and "it trained on cpu, and device=auto gives cuda here" in proc.stderr, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=" in proc.stderr and proc.stderr.count("kd: error:") == 1
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before
    state = load_checkpoint(folder / "state.pt")  # as a GPU run saves it: a CUDA generator's state too
    state["rng"]["cuda"] = state["rng"]["cpu"].clone()
    save_checkpoint(folder / "state.pt", {k: v for k, v in state.items() if k != "format_version"})
    proc = kd(RUN[0], f"resume={folder}", check=False)
    assert proc.returncode == 2 and "it trained on cuda, and device=auto gives cpu here" in proc.stderr, proc.stderr
    assert "on a machine with a GPU" in proc.stderr
    del state["rng"]["cuda"]  # the same state from the CPU it ran on resumes
    save_checkpoint(folder / "state.pt", {k: v for k, v in state.items() if k != "format_version"})
    kd(RUN[0], f"resume={folder}")
    assert (folder / "checkpoint.pt").is_file()
    on_cpu = kd.cwd / "on-cpu"  # device=cpu typed: it resumes on the CPU wherever a GPU is
    proc = kd(*RUN, "device=cpu", f"hydra.run.dir={on_cpu}", extra_env=signal_at(signal.SIGTERM, 2, 7), check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        kd(RUN[0], f"resume={on_cpu}")
    assert (on_cpu / "checkpoint.pt").is_file()
    sweep = kd.cwd / "sweep"  # a sweep's stopped job, the sweep continued where a GPU appeared
    proc = kd(*RUN, "-m", "seed=0,4", f"hydra.sweep.dir={sweep}", extra_env=signal_at(signal.SIGINT, 1, 3),
              check=False)
    assert proc.returncode == 130, proc.stderr
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr("kd_cli.prepare.native_bf16", lambda device: True)  # as on this CPU: only the device differs
        proc = kd(RUN[0], f"resume={sweep}", check=False)
        assert proc.returncode == 2 and "sweep job 0_" in proc.stderr and "it trained on cpu" in proc.stderr, \
            proc.stderr
        # a cluster launcher's nodes resume the job on their own device: not settled on this machine
        from hydra import compose, initialize_config_module

        from kd_cli import continuation
        from kd_cli.config import CONFIG_MODULE

        m.setenv("KD_DATA_ROOT", str(kd.root))
        jobs = continuation.sweep_jobs(RUN[1:] + ["seed=0,4"])
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            def check(launcher):
                continuation.check_sweep_continuation(RUN[0], sweep, jobs,
                                                      lambda job: compose("train_teacher", overrides=job),
                                                      launcher=launcher)
            check("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
            with pytest.raises(KDError, match="it trained on cpu"):
                check("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")

def test_the_training_loop_refuses_a_state_from_another_kind_of_device():
    """Preflight refuses such a resume first; the loop itself holds for any caller (a script, a
    cluster launcher's node, where preflight does not settle the device)."""
    from kd_cli.train import set_rng_state

    cpu_state = {"cpu": torch.get_rng_state()}
    with pytest.raises(KDError, match="saved on cuda and cannot continue on cpu"):
        set_rng_state({**cpu_state, "cuda": cpu_state["cpu"]}, torch.device("cpu"))
    with pytest.raises(KDError, match="saved on cpu and cannot continue on cuda"):
        set_rng_state(cpu_state, torch.device("cuda"))
    set_rng_state(cpu_state, torch.device("cpu"))


# 9 epochs at 1 px: the teacher's targets are cached over the 9 shifted copies (teachers.caches_shifts)
DISTILL = ["distill", "model.hidden=[16]", "epochs=9", "batch_size=50", "T=4", "data.jitter=1"]


def stopped_distillation(kd):
    """A teacher, a whole distillation from it, and the same distillation stopped mid-epoch."""
    kd("train-teacher", "model.hidden=[24]", "epochs=1")
    (teacher,) = (kd.cwd / "outputs" / "train-teacher").glob("*/checkpoint.pt")
    kd(*DISTILL, f"hydra.run.dir={kd.cwd / 'whole'}")  # no teacher=: the newest one
    proc = kd(*DISTILL, f"hydra.run.dir={kd.cwd / 'stopped'}", extra_env=signal_at(signal.SIGTERM, 2, 4),
              check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    return teacher


def test_a_stopped_distillation_resumes_with_its_own_teacher(kd):
    stopped_distillation(kd)
    kd("train-teacher", "model.hidden=[8]", "epochs=1")  # now the newest: resume must not take it
    kd("distill", f"resume={kd.cwd / 'stopped'}")
    assert_same_run(kd.cwd / "stopped", kd.cwd / "whole")


def test_a_stopped_distillation_from_an_ensemble_resumes_with_every_teacher(kd):
    """Two teachers, recorded in the state: the resumed run combines both again (with one of them
    only, it would end elsewhere and record one teacher)."""
    for name, hidden in (("t1", 24), ("t2", 32)):
        kd("train-teacher", f"model.hidden=[{hidden}]", "epochs=1", f"hydra.run.dir={kd.cwd / name}")
    both = f"teacher=[{kd.cwd / 't1' / 'checkpoint.pt'},{kd.cwd / 't2' / 'checkpoint.pt'}]"
    kd(*DISTILL, both, f"hydra.run.dir={kd.cwd / 'whole'}")
    proc = kd(*DISTILL, both, f"hydra.run.dir={kd.cwd / 'stopped'}", extra_env=signal_at(signal.SIGTERM, 2, 4),
              check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    kd("distill", f"resume={kd.cwd / 'stopped'}")
    assert_same_run(kd.cwd / "stopped", kd.cwd / "whole")
    assert len(json.loads((kd.cwd / "stopped" / "metrics.json").read_text())["teacher"]) == 2


def test_a_stopped_run_with_elastic_distortion_resumes_to_the_untouched_run(kd):
    """The distortion draws from the RNG at every step: a run stopped mid-epoch must draw, from
    there, what the untouched run drew."""
    args = [*RUN, "data.jitter=1", "data.elastic.scale=3"]
    kd(*args, f"hydra.run.dir={kd.cwd / 'whole'}")
    proc = kd(*args, f"hydra.run.dir={kd.cwd / 'stopped'}", extra_env=signal_at(signal.SIGINT, 2, 7), check=False)
    assert proc.returncode == 130, proc.stderr
    kd(RUN[0], f"resume={kd.cwd / 'stopped'}")
    assert_same_run(kd.cwd / "stopped", kd.cwd / "whole")


def test_a_run_stopped_before_the_elastic_key_existed_resumes_and_one_that_set_it_keeps_it(kd):
    run_dir = kd.cwd / "stopped"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    record = run_dir / ".hydra" / "config.yaml"
    text = record.read_text()
    block = "  elastic:\n    scale: 0\n    sigma: 4\n"
    assert block in text
    record.write_text(text.replace(block, ""))  # as a run recorded before 2026-12-05: off
    kd(RUN[0], f"resume={run_dir}")
    assert (run_dir / "checkpoint.pt").exists()
    other = kd.cwd / "other"  # but a run that distorted does not continue without it
    kd(*RUN, f"hydra.run.dir={other}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    record = other / ".hydra" / "config.yaml"
    record.write_text(record.read_text().replace(block, "  elastic:\n    scale: 3\n    sigma: 4\n"))
    proc = kd(RUN[0], f"resume={other}", check=False)
    assert proc.returncode == 2 and "started with data.elastic.scale=3" in proc.stderr, proc.stderr


def test_a_stopped_distillation_resumes_from_any_folder_with_the_teacher_it_recorded(kd):
    """Its command's teacher= is a path relative to where it started; the run reads the teacher
    its state recorded (an absolute path and a sha256), so it resumes from anywhere."""
    kd("train-teacher", "model.hidden=[24]", "epochs=1", f"hydra.run.dir={kd.cwd / 't'}")
    args = [*DISTILL, "teacher=t/checkpoint.pt"]
    kd(*args, f"hydra.run.dir={kd.cwd / 'whole'}")
    proc = kd(*args, f"hydra.run.dir={kd.cwd / 'stopped'}", extra_env=signal_at(signal.SIGTERM, 2, 4), check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    elsewhere = kd.cwd / "elsewhere"
    elsewhere.mkdir()
    proc = run_in_process(["distill", f"resume={kd.cwd / 'stopped'}"], elsewhere, {"KD_DATA_ROOT": str(kd.root)})
    assert proc.returncode == 0, proc.stderr
    assert_same_run(kd.cwd / "stopped", kd.cwd / "whole")


def test_resume_refuses_a_changed_teacher_and_leaves_the_run_as_it_was(kd):
    teacher = stopped_distillation(kd)
    ckpt = load_checkpoint(teacher)
    ckpt["state_dict"] = {k: v + 0.01 for k, v in ckpt["state_dict"].items()}
    save_checkpoint(teacher, {k: v for k, v in ckpt.items() if k != "format_version"})
    folder = kd.cwd / "stopped"
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    proc = kd("distill", f"resume={folder}", check=False)
    assert proc.returncode == 2 and "changed" in proc.stderr and str(teacher) in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before  # no error.txt, .hydra as it was


def test_resume_refuses_what_it_cannot_continue(kd, untouched):
    for args, says in [
        ([f"resume={untouched}"], "already finished"),
        ([f"resume={kd.cwd / 'nowhere'}"], "not a kd run folder"),
        ([f"resume={untouched}", "epochs=3"], "takes no other arguments"),
    ]:
        proc = kd(RUN[0], *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    proc = kd("train-student", f"resume={untouched}", check=False)
    assert proc.returncode == 2 and "is a train-teacher run" in proc.stderr


def test_resume_refuses_a_config_that_changed_since_the_run_started(kd):
    """The same command composes another config once a recipe file has changed; a stopped run
    continues only with the config it started with. A changed file is played here by the run's own
    record of what it started with (.hydra/config.yaml), which is what the check reads."""
    run_dir = kd.cwd / "stopped"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    record = run_dir / ".hydra" / "config.yaml"
    record.write_text(record.read_text().replace("lr: 0.3\n", "lr: 0.5\n"))
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    proc = kd(RUN[0], f"resume={run_dir}", check=False)
    assert proc.returncode == 2 and "started with lr=0.5, and its command now gives lr=0.3" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_resume_refuses_a_config_that_lost_a_key_since_the_run_started(kd):
    """A key the run started with that the command no longer composes (a recipe file that dropped
    it) is a changed config too, not only a key whose value moved."""
    run_dir = kd.cwd / "stopped"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    record = run_dir / ".hydra" / "config.yaml"
    record.write_text(record.read_text() + "dropped_knob: 3\n")
    proc = kd(RUN[0], f"resume={run_dir}", check=False)
    assert proc.returncode == 2 and "started with dropped_knob=3" in proc.stderr, proc.stderr
    assert not (run_dir / "checkpoint.pt").exists()


def test_resume_refuses_a_config_that_gained_a_key_since_the_run_started(kd):
    """The mirror: a key the command composes now that the run never recorded (a recipe file that
    added it) would train the rest of the run with a setting it did not start with."""
    run_dir = kd.cwd / "stopped"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    record = run_dir / ".hydra" / "config.yaml"
    lines = record.read_text().splitlines(keepends=True)
    assert any(line.startswith("eval_batch_size:") for line in lines)
    record.write_text("".join(line for line in lines if not line.startswith("eval_batch_size:")))
    proc = kd(RUN[0], f"resume={run_dir}", check=False)
    assert proc.returncode == 2 and "started with eval_batch_size='<absent>'" in proc.stderr, proc.stderr
    assert not (run_dir / "checkpoint.pt").exists()


def test_a_full_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"stage": "s", "arch": {}, "state_dict": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(KDError, match="No space left on device.*previous file there is intact"):
        save_checkpoint(path, {"stage": "s", "arch": {}, "state_dict": {}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(KDError, match="could not write"):
        save_checkpoint(not_a_dir / "checkpoint.pt", {"stage": "s", "arch": {}, "state_dict": {}})


@pytest.mark.subprocess
def test_runs_started_together_get_their_own_folders(kd):
    env = {**os.environ, "KD_DATA_ROOT": str(kd.root)}
    procs = [subprocess.Popen([KD, "train-student", "epochs=1", "data.train_limit=100", "model.hidden=[8]"],
                              cwd=kd.cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    dirs = list((kd.cwd / "outputs" / "train-student").iterdir())
    assert len(dirs) == 2 and all((d / "checkpoint.pt").exists() for d in dirs)


def test_a_stopped_sweep_job_resumes_from_its_folder(kd, untouched):
    """A sweep job's folder name holds '=' and ',' (0_epochs=4,...): resume= takes it as typed."""
    sweep = kd.cwd / "sweep"
    proc = kd(*RUN, "-m", "seed=0,4", f"hydra.sweep.dir={sweep}", extra_env=signal_at(signal.SIGINT, 2, 3),
              check=False)
    assert proc.returncode == 130, proc.stderr
    (job,) = sweep.glob("0_*")  # the stop ends the whole sweep: job 1 never started
    assert "=" in job.name and "," in job.name and not (job / "checkpoint.pt").exists()
    resumed = kd(RUN[0], f"resume={job}")
    assert resumed.stdout.strip().splitlines()[-1].startswith("test errors: ")
    assert_same_run(job, untouched)  # seed 0, as the untouched run


@pytest.fixture
def held_by_another(monkeypatch):
    """Lock a run folder as a kd process training in it does. flock conflicts between two opens of
    the file, in one process too, so no second process is needed."""
    fcntl = pytest.importorskip("fcntl")
    held = []

    def hold(folder):
        f = open(folder / ".kd.lock", "a")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(f)
    yield hold
    for f in held:
        f.close()


def files_of(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_another_process_is_training_is_neither_resumed_nor_reported_stopped(kd, held_by_another):
    run_dir = kd.cwd / "run"
    kd(*RUN, f"hydra.run.dir={run_dir}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    held_by_another(run_dir)  # as if resume= were typed twice: the first one trains
    before = files_of(run_dir)
    proc = kd(RUN[0], f"resume={run_dir}", check=False)
    assert proc.returncode == 2 and "is in use" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert files_of(run_dir) == before  # its .hydra record untouched, no error.txt
    report = kd("report", str(run_dir)).stdout
    assert "| running |" in report and "| stopped |" not in report and "1 jobs: 1 running" in report


def test_a_sweep_with_a_job_another_process_is_training_is_not_continued(kd, held_by_another):
    sweep = kd.cwd / "sweep"
    kd(*RUN, "-m", "seed=0,4", f"hydra.sweep.dir={sweep}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    (job,) = sweep.glob("0_*")
    held_by_another(job)
    before = files_of(sweep)
    proc = kd(RUN[0], f"resume={sweep}", check=False)
    assert proc.returncode == 2 and "is in use" in proc.stderr and files_of(sweep) == before
    # refused by the checks before Hydra starts (with a parallel launcher other jobs would start)
    from kd_cli import continuation

    with pytest.raises(KDError, match="is in use"):
        continuation.check_sweep_continuation(RUN[0], sweep, continuation.sweep_jobs(["seed=0,4"]), lambda job: None)


def test_a_run_whose_folder_was_taken_after_the_checks_writes_nothing_into_it(kd, held_by_another, monkeypatch):
    # another process takes the folder between kd's checks and the stage's start: the stage is
    # refused by the lock itself, and records no error in the other process's folder
    from kd_cli import run

    sweep = kd.cwd / "sweep"
    kd(*RUN, "-m", "seed=0", f"hydra.sweep.dir={sweep}", extra_env=signal_at(signal.SIGINT, 2, 3), check=False)
    (job,) = sweep.glob("0_*")
    held_by_another(job)
    monkeypatch.setattr(run, "in_use", lambda folder: False)  # the checks ran before it was taken
    state = (job / "state.pt").read_bytes()
    proc = kd(RUN[0], f"resume={sweep}", check=False)
    assert proc.returncode == 2 and "is in use" in proc.stderr, proc.stderr
    assert (job / "state.pt").read_bytes() == state and not (job / "error.txt").exists()


def test_a_folder_on_a_filesystem_without_locks_runs_unlocked(tmp_path, monkeypatch):
    # some network mounts answer flock with ENOLCK: kd trains there as it did before locks
    fcntl = pytest.importorskip("fcntl")
    from kd_cli import run

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with run.hold(tmp_path):
        assert not run.in_use(tmp_path)
