"""Runs that survive: kill -9 or Ctrl-C, resume, and end bit for bit where an untouched run ends."""
import errno
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from kd_cli.checkpoint import load_checkpoint, save_checkpoint
from kd_cli.errors import KDError

from conftest import KD

# about 40 batches an epoch; the epochs make the run a few seconds long even on a fast machine, so
# a signal sent after the first epoch's save lands mid-training
EPOCHS = 60
RUN = ["train-teacher", "model.hidden=[128,128]", f"epochs={EPOCHS}", "batch_size=15"]


def start(kd, run_dir, args=RUN):
    env = {**os.environ, "KD_DATA_ROOT": str(kd.root)}
    return subprocess.Popen([KD, *args, f"hydra.run.dir={run_dir}"], cwd=kd.cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < end
        time.sleep(0.02)


def somewhere_mid_run(finished_run):
    """Seconds to wait after the first epoch's save: a random point in the first 40% of what a
    whole run of the same args took on this machine, so the signal lands mid-training on a fast
    machine as on a slow one (a fixed 0-1 s outlived a whole run on CI's machine)."""
    train_seconds = json.loads((finished_run / "metrics.json").read_text())["train_seconds"]
    return random.uniform(0, 0.4 * train_seconds)


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
    env = {**os.environ, "KD_DATA_ROOT": str(tiny_root)}
    subprocess.run([KD, *RUN, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd, env=env, check=True,
                   capture_output=True)
    return cwd / "run"


@pytest.mark.parametrize("attempt", range(2))
def test_sigkill_at_a_random_batch_then_resume(kd, untouched, attempt):
    run_dir = kd.cwd / "killed"
    proc = start(kd, run_dir)
    wait_for(run_dir / "state.pt", proc)  # the first epoch's state is saved
    time.sleep(somewhere_mid_run(untouched))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "checkpoint.pt").exists()
    state = load_checkpoint(run_dir / "state.pt")  # whole, even if the kill hit a save
    assert 1 <= state["epoch"] < EPOCHS
    kd(RUN[0], f"resume={run_dir}")
    assert_same_run(run_dir, untouched)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_at_the_batch_and_say_how_to_resume(kd, untouched, sig):
    run_dir = kd.cwd / "stopped"
    proc = start(kd, run_dir)
    wait_for(run_dir / "state.pt", proc)
    time.sleep(somewhere_mid_run(untouched))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"resume={run_dir}" in err and "Traceback" not in err
    state = load_checkpoint(run_dir / "state.pt")
    assert not (run_dir / "checkpoint.pt").exists() and (state["epoch"], state["step"]) >= (1, 0)
    resumed = kd(RUN[0], f"resume={run_dir}")
    assert resumed.stdout.strip().splitlines()[-1].startswith("test errors: ")
    assert_same_run(run_dir, untouched)


def test_a_stopped_distillation_resumes_with_its_own_teacher(kd):
    kd("train-teacher", "model.hidden=[64]", "epochs=2")
    args = ["distill", "epochs=15", "batch_size=15", "T=4"]  # no teacher=: the newest one
    kd(*args, f"hydra.run.dir={kd.cwd / 'whole'}")
    proc = start(kd, kd.cwd / "stopped", args)
    wait_for(kd.cwd / "stopped" / "state.pt", proc)
    time.sleep(somewhere_mid_run(kd.cwd / "whole"))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    kd("train-teacher", "model.hidden=[16]", "epochs=1")  # now the newest: resume must not take it
    kd("distill", f"resume={kd.cwd / 'stopped'}")
    assert_same_run(kd.cwd / "stopped", kd.cwd / "whole")


def test_resume_refuses_what_it_cannot_continue(kd, untouched):
    for args, says in [
        ([f"resume={untouched}"], "already finished"),
        ([f"resume={kd.cwd / 'nowhere'}"], "not a kd run folder"),
        ([f"resume={untouched}", "epochs=3"], "takes no other arguments"),
    ]:
        proc = kd(RUN[0], *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    proc = kd("train-student", f"resume={untouched}", check=False)
    assert "is a train-teacher run" in proc.stderr


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


def test_runs_started_together_get_their_own_folders(kd):
    env = {**os.environ, "KD_DATA_ROOT": str(kd.root)}
    procs = [subprocess.Popen([KD, "train-student", "epochs=1", "data.train_limit=100"], cwd=kd.cwd,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    dirs = list((kd.cwd / "outputs" / "train-student").iterdir())
    assert len(dirs) == 3 and all((d / "checkpoint.pt").exists() for d in dirs)


def test_a_killed_sweep_job_resumes_from_its_folder(kd):
    """A sweep job's folder name holds '=' and ',' (0_epochs=60,...): resume= takes it as typed."""
    sweep = kd.cwd / "sweep"
    args = [*RUN, "-m", "seed=3,4"]
    env = {**os.environ, "KD_DATA_ROOT": str(kd.root)}
    proc = subprocess.Popen([KD, *args, f"hydra.sweep.dir={sweep}"], cwd=kd.cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 120
    while not list(sweep.glob("0_*/state.pt")):
        assert proc.poll() is None and time.time() < end
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (job,) = sweep.glob("0_*")
    assert "=" in job.name and "," in job.name and not (job / "checkpoint.pt").exists()
    resumed = kd(RUN[0], f"resume={job}")
    assert resumed.stdout.strip().splitlines()[-1].startswith("test errors: ")
    history = json.loads((job / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)) and not (job / "state.pt").exists()
