"""No silent wrong result: another run's folder, a changed sweep, non-finite numbers, a state that
is not a model, a full disk, damaged records. Each is refused with one `kd: error:` line and exit
code 2, and leaves the files as they were (or, for a sweep, continues it as it was launched)."""
import errno
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from kd_cli.checkpoint import load_checkpoint, save_checkpoint
from kd_cli.errors import KDError

from conftest import write_root

SMALL = ["model.hidden=[16]", "batch_size=50"]


def snapshot(folder):
    """Every file under folder, with its bytes: what 'left as it was' is checked against."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def refused(proc, *says):
    """Exit code 2, one `kd: error:` line and no traceback (a run that got as far as training has
    its progress bar above it on stderr)."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("kd: error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert all(s in lines[0] for s in says), lines[0]
    return lines[0]


def stop_at(epoch, batch, sig=signal.SIGINT):
    return {"KD_TEST_SIGNAL_AT": f"{signal.Signals(sig).name}@{epoch}:{batch}"}


# ---- a folder belongs to one run ---------------------------------------------------------------

def test_a_new_run_never_continues_or_overwrites_another_runs_folder(kd):
    stopped, finished = kd.cwd / "stopped", kd.cwd / "finished"
    kd("train-student", *SMALL, "epochs=3", f"hydra.run.dir={stopped}", extra_env=stop_at(2, 3), check=False)
    kd("train-student", *SMALL, "epochs=1", f"hydra.run.dir={finished}")
    for folder, says in ((stopped, f"resume={stopped}"), (finished, "finished run")):
        before = snapshot(folder)
        proc = kd("train-student", *SMALL, "epochs=2", "lr=0.01", f"hydra.run.dir={folder}", check=False)
        refused(proc, str(folder), says, "choose a new hydra.run.dir")
        assert snapshot(folder) == before
    before = snapshot(finished)  # evaluate, too, writes only into a folder of its own
    proc = kd("evaluate", f"checkpoint={finished / 'checkpoint.pt'}", f"hydra.run.dir={finished}", check=False)
    refused(proc, "finished run")
    assert snapshot(finished) == before


def test_a_folder_whose_run_stopped_before_its_first_epoch_is_not_taken_over(kd):
    # kill -9 in epoch 1 leaves Hydra's record and no state.pt: still another run's folder
    folder = kd.cwd / "early"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("epochs: 3\n")
    before = snapshot(folder)
    refused(kd("train-student", *SMALL, "epochs=1", f"hydra.run.dir={folder}", check=False),
            "stopped before its first epoch ended", "choose a new hydra.run.dir")
    assert snapshot(folder) == before


def test_a_failed_runs_folder_is_not_taken_over(kd):
    # a new run there would leave the old error.txt beside its own metrics.json
    folder = kd.cwd / "failed"
    folder.mkdir()
    (folder / "error.txt").write_text("training diverged at epoch 2\n")
    before = snapshot(folder)
    refused(kd("train-student", *SMALL, "epochs=1", f"hydra.run.dir={folder}", check=False),
            "a failed run (error.txt)", "choose a new hydra.run.dir")
    assert snapshot(folder) == before


def test_an_interrupted_sweep_continues_with_one_command(kd):
    """Job 0 finishes, job 1 is stopped mid-epoch, job 2 never starts; `resume=<sweep>` keeps job 0
    as it is, resumes job 1 to the result of a run never stopped, and runs job 2."""
    sweep = kd.cwd / "sweep"
    args = ["train-student", "-m", "epochs=2,4,3", *SMALL, f"hydra.sweep.dir={sweep}"]
    proc = kd(*args, extra_env=stop_at(3, 2), check=False)  # only the 4-epoch job reaches epoch 3
    assert proc.returncode == 130 and f"resume={sweep}" in proc.stderr, proc.stderr
    report = kd("report", str(sweep)).stdout
    assert "3 jobs: 1 done, 1 stopped, 1 not started" in report
    job0 = next(sweep.glob("0_*"))
    kept = snapshot(job0)
    proc = kd("train-student", f"resume={sweep}")
    assert snapshot(job0) == kept  # finished before: not retrained, not rewritten
    kd("train-student", "epochs=4", *SMALL, f"hydra.run.dir={kd.cwd / 'whole'}")
    job1 = next(sweep.glob("1_*"))
    whole = json.loads((kd.cwd / "whole" / "metrics.json").read_text())
    assert json.loads((job1 / "metrics.json").read_text())["history"] == whole["history"]
    w1, w = (load_checkpoint(d / "checkpoint.pt")["state_dict"] for d in (job1, kd.cwd / "whole"))
    assert w1.keys() == w.keys() and all(torch.equal(w1[k], w[k]) for k in w)
    assert "3 jobs: 3 done" in kd("report", str(sweep)).stdout


def test_a_sweep_job_resumed_on_its_own_stays_one_of_the_sweep(kd):
    """The report says to continue a stopped job with its sweep; one resumed on its own instead
    (resume=<job>) records resume= too, which neither splits its seed group in the report nor
    keeps the sweep from being continued."""
    sweep = kd.cwd / "sweep"
    args = ["train-student", "-m", "seed=0,1,2", *SMALL, "epochs=2", f"hydra.sweep.dir={sweep}"]
    proc = kd(*args, extra_env=stop_at(1, 2), check=False)  # job 0 stops in its second epoch
    assert proc.returncode == 130, proc.stderr
    job0 = next(sweep.glob("0_*"))
    assert f"continue with resume={sweep}" in kd("report", str(sweep)).stdout
    kd("train-student", f"resume={job0}")
    assert "resume=" in (job0 / ".hydra" / "overrides.yaml").read_text()
    kd("train-student", f"resume={sweep}")  # jobs 1 and 2
    assert "3 jobs: 3 done" in kd("report", str(sweep)).stdout
    # job 2's records as a run resumed on its own writes them (the continuation above rewrote job 0's)
    job2 = next(sweep.glob("2_*"))
    for name, line in (("overrides.yaml", f"- resume={job2}\n"), ("config.yaml", f"resume: {job2}\n")):
        record = job2 / ".hydra" / name
        record.write_text(record.read_text().replace("resume: null\n", "") + line)
    from kd_cli.jobs import rows_of
    from kd_cli.report import seed_groups, swept_keys

    rows = rows_of([sweep])
    assert rows[2]["values"]["resume"] == str(job2)
    swept, fixed = swept_keys(rows)
    assert swept == ["seed"] and "resume" not in fixed
    (group,) = seed_groups(rows, swept)
    assert group["n"] == 3


def test_a_sweep_without_teacher_keeps_the_teacher_that_was_newest_when_it_started(kd):
    """`teacher` unset means the newest teacher: found once, at launch, and recorded as teacher=, so
    a teacher trained while the sweep is stopped neither joins it nor goes unseen."""
    kd("train-teacher", *SMALL, "epochs=1", f"hydra.run.dir={kd.cwd / 'outputs' / 'train-teacher' / 'a'}")
    sweep = kd.cwd / "sweep"
    proc = kd("distill", "-m", "T=2,5", *SMALL, "epochs=2", f"hydra.sweep.dir={sweep}",
              extra_env=stop_at(2, 2), check=False)  # job 0 stops in its epoch 2
    assert proc.returncode == 130, proc.stderr
    kd("train-teacher", *SMALL, "epochs=1", "seed=1", f"hydra.run.dir={kd.cwd / 'outputs' / 'train-teacher' / 'b'}")
    kd("distill", f"resume={sweep}")
    first = str(kd.cwd / "outputs" / "train-teacher" / "a" / "checkpoint.pt")
    jobs = sorted(sweep.glob("[0-9]_*"))
    assert len(jobs) == 2
    assert [json.loads((job / "metrics.json").read_text())["teacher"]["path"] for job in jobs] == [first, first]
    assert all(f"teacher={first}" in (job / ".hydra" / "overrides.yaml").read_text() for job in jobs)
    before = snapshot(sweep)  # the same command again now names the newer teacher: refused, not mixed
    proc = kd("distill", "-m", "T=2,5", *SMALL, "epochs=2", f"hydra.sweep.dir={sweep}", check=False)
    refused(proc, "teacher=", "choose a new hydra.sweep.dir")
    assert snapshot(sweep) == before


def test_a_sweep_with_another_config_into_the_same_folder_is_refused_by_job(kd):
    for name, hidden in (("t1", 24), ("t2", 32)):
        kd("train-teacher", f"model.hidden=[{hidden}]", "epochs=1", f"hydra.run.dir={kd.cwd / name}")
    sweep = kd.cwd / "sweep"
    kd("distill", "-m", "T=2,4", *SMALL, "epochs=1", f"teacher={kd.cwd / 't1' / 'checkpoint.pt'}",
       f"hydra.sweep.dir={sweep}")
    before = snapshot(sweep)
    proc = kd("distill", "-m", "T=2,4", *SMALL, "epochs=1", f"teacher={kd.cwd / 't2' / 'checkpoint.pt'}",
              f"hydra.sweep.dir={sweep}", check=False)  # the job folders' names do not hold teacher
    refused(proc, "sweep job 0_", "teacher=", "choose a new hydra.sweep.dir")
    proc = kd("distill", "-m", "T=2,5", *SMALL, "epochs=1", f"teacher={kd.cwd / 't1' / 'checkpoint.pt'}",
              f"hydra.sweep.dir={sweep}", check=False)
    refused(proc, "sweep job 1_", "T=5")
    assert snapshot(sweep) == before


def test_a_sweep_whose_records_changed_or_are_damaged_is_refused_as_it_was(kd):
    """A finished two-job sweep, relaunched: a job recorded in fp32 is not continued under today's
    precision=auto (its later jobs could train in bf16), and a damaged job record or multirun.yaml
    is one line, not a traceback."""
    sweep = kd.cwd / "sweep"
    args = ["train-student", "-m", "seed=0,1", *SMALL, "epochs=1", f"hydra.sweep.dir={sweep}"]
    kd(*args)
    record = next(sweep.glob("0_*")) / ".hydra" / "config.yaml"
    text = record.read_text()
    assert "precision: auto\n" in text
    for damaged, says in ((text.replace("precision: auto\n", "precision: fp32\n"), "precision="),
                          ("[unclosed", "unreadable")):
        record.write_text(damaged)
        before = snapshot(sweep)
        refused(kd(*args, check=False), "sweep job 0_" if says == "precision=" else "", says)
        assert snapshot(sweep) == before
    record.write_text(text)
    (sweep / "multirun.yaml").write_text("[unclosed")
    before = snapshot(sweep)
    refused(kd("train-student", f"resume={sweep}", check=False), "multirun.yaml is unreadable")
    assert snapshot(sweep) == before


# ---- what the config does not pin down: code, data files, teacher files, settled precision --------

def test_a_stopped_run_resumes_only_with_the_code_and_data_files_it_started_with(kd, tmp_path):
    """After a `git pull` or with KD_DATA_ROOT pointing elsewhere the same config trains something
    else: the rest of the run would mix two versions in one result. A changed module is played by
    the state's own record of the code it started with, which is what the check reads."""
    run_dir = kd.cwd / "stopped"
    args = ["train-student", *SMALL, "epochs=3"]
    proc = kd(*args, f"hydra.run.dir={run_dir}", extra_env=stop_at(2, 3), check=False)
    assert proc.returncode == 130, proc.stderr
    state_path = run_dir / "state.pt"
    original = state_path.read_bytes()
    state = load_checkpoint(state_path)
    assert set(state["code_sha256"]) >= {"losses.py", "train.py", "models.py"} and state["data_sha256"]
    state["code_sha256"]["losses.py"] = "0" * 16
    save_checkpoint(state_path, {k: v for k, v in state.items() if k != "format_version"})
    before = snapshot(run_dir)
    refused(kd("train-student", f"resume={run_dir}", check=False), "kd's code", "losses.py", "start a new run")
    assert snapshot(run_dir) == before
    # another kd also composes another config: the refusal names the code, the cause, not the config
    config = run_dir / ".hydra" / "config.yaml"
    kept = config.read_text()
    config.write_text(kept + "added_by_another_kd: 1\n")
    refused(kd("train-student", f"resume={run_dir}", check=False), "kd's code", "losses.py")
    config.write_text(kept)
    state_path.write_bytes(original)
    other = write_root(tmp_path / "other-data", seed=1)  # the same file names and sizes, other images
    before = snapshot(run_dir)
    refused(kd("train-student", f"resume={run_dir}", extra_env={"KD_DATA_ROOT": str(other)}, check=False),
            "the data files", str(other))
    assert snapshot(run_dir) == before
    kd("train-student", f"resume={run_dir}")  # the same code and data: it resumes
    assert json.loads((run_dir / "metrics.json").read_text())["data_sha256"] == state["data_sha256"]


def test_a_sweep_continues_only_with_the_code_teacher_files_and_precision_its_jobs_ran_with(kd, monkeypatch, tiny_root):
    """A teacher file overwritten between two launches of the same sweep, a module changed, or a
    machine on which precision=auto settles otherwise: the jobs still to run would differ from the
    ones kept, with nothing in the sweep's config to show it. With no job left to run, nothing
    mixes: the same command goes through. A changed module is played by a job's own record."""
    import shutil

    import kd_cli.prepare

    for name, seed in (("t1", 0), ("t2", 1)):
        kd("train-teacher", "model.hidden=[24]", "epochs=1", f"seed={seed}", f"hydra.run.dir={kd.cwd / name}")
    teacher = kd.cwd / "teacher.pt"
    teacher.write_bytes((kd.cwd / "t1" / "checkpoint.pt").read_bytes())
    sweep = kd.cwd / "sweep"
    args = ["distill", "-m", "T=2,4", *SMALL, "epochs=1", f"teacher={teacher}", f"hydra.sweep.dir={sweep}"]
    kd(*args)
    teacher.write_bytes((kd.cwd / "t2" / "checkpoint.pt").read_bytes())
    kept = snapshot(sweep)
    kd(*args)  # every job finished: kept, nothing runs
    assert snapshot(sweep) == kept
    teacher.rename(kd.cwd / "moved.pt")
    kd(*args)  # nor with the teacher moved away: nothing reads it
    assert snapshot(sweep) == kept
    (kd.cwd / "moved.pt").rename(teacher)
    job1 = next(sweep.glob("1_*"))
    shutil.move(job1, kd.cwd / "job1")  # job 1 left to run
    before = snapshot(sweep)
    refused(kd(*args, check=False), "sweep job 0_", "the teacher file", str(teacher), "choose a new hydra.sweep.dir")
    assert snapshot(sweep) == before
    teacher.write_bytes((kd.cwd / "t1" / "checkpoint.pt").read_bytes())
    metrics = next(sweep.glob("0_*")) / "metrics.json"
    text = metrics.read_text()
    metrics.write_text(text.replace('"train.py": "', '"train.py": "0'))
    before = snapshot(sweep)
    refused(kd(*args, check=False), "sweep job 0_", "kd's code", "train.py")
    assert snapshot(sweep) == before
    metrics.write_text(text)
    settled = json.loads(metrics.read_text())["precision"]
    other_machine = lambda device: settled == "fp32"  # noqa: E731  (auto settles the other way)
    monkeypatch.setattr(kd_cli.prepare, "native_bf16", other_machine)
    before = snapshot(sweep)
    refused(kd(*args, check=False), "sweep job 0_", f"auto settled to {settled} there")
    assert snapshot(sweep) == before
    # jobs a cluster launcher runs elsewhere settle precision there, not on the machine that launches
    from hydra import compose, initialize_config_module

    from kd_cli import continuation
    from kd_cli.preflight import CONFIG_MODULE

    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    jobs = continuation.sweep_jobs([a for a in args[2:] if not a.startswith("hydra.")])
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        def check(launcher):
            continuation.check_sweep_continuation("distill", sweep, jobs, lambda job: compose("distill", overrides=job),
                                                  launcher=launcher)
        check("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
        with pytest.raises(KDError, match="auto settled to"):
            check("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
    monkeypatch.undo()
    kd(*args)  # as it ran: job 1 runs
    assert len(list(sweep.glob("[0-9]_*/metrics.json"))) == 2


def test_an_evaluate_sweep_continues_only_with_the_checkpoint_files_it_counted(kd):
    """kd evaluate's jobs count the files checkpoint= names: one overwritten between two launches
    would leave the kept jobs' counts from the old file beside new ones from the new."""
    for name, seed in (("a", 0), ("b", 1)):
        kd("train-student", *SMALL, "epochs=1", f"seed={seed}", f"hydra.run.dir={kd.cwd / name}")
    a, b = kd.cwd / "a" / "checkpoint.pt", kd.cwd / "b" / "checkpoint.pt"
    original = a.read_bytes()
    sweep = kd.cwd / "sweep"
    args = ["evaluate", "-m", f"checkpoint={a},{b}", f"hydra.sweep.dir={sweep}"]
    kd(*args)
    recorded = json.loads(next(sweep.glob("0_*/metrics.json")).read_text())["checkpoint_files"]
    assert recorded == [{"path": str(a.resolve()), "sha256": hashlib.sha256(original).hexdigest()}]
    a.write_bytes(b.read_bytes())
    kept = snapshot(sweep)
    kd(*args)  # nothing left to run: nothing mixes
    assert snapshot(sweep) == kept
    job1 = next(sweep.glob("1_*"))
    job1.rename(kd.cwd / "job1")  # job 1 left to run
    before = snapshot(sweep)
    refused(kd(*args, check=False), "sweep job 0_", "the checkpoint file", str(a.resolve()), "choose a new hydra.sweep.dir")
    assert snapshot(sweep) == before
    a.unlink()
    refused(kd(*args, check=False), "sweep job 0_", "the checkpoint file", "checkpoint not found")
    assert snapshot(sweep) == before
    a.write_bytes(original)
    kd(*args)  # the file it counted: job 1 runs
    assert len(list(sweep.glob("[0-9]_*/metrics.json"))) == 2


def test_a_run_begun_with_a_key_added_with_plus_still_resumes(kd):
    """Before kd refused keys added with +, a run could start with one (nothing read it); resumed, it
    continues with its own record rather than being stranded."""
    run_dir = kd.cwd / "stopped"
    proc = kd("train-student", *SMALL, "epochs=3", f"hydra.run.dir={run_dir}", extra_env=stop_at(2, 3), check=False)
    assert proc.returncode == 130, proc.stderr
    for name, line in (("overrides.yaml", "- +foo=1\n"), ("config.yaml", "foo: 1\n")):
        record = run_dir / ".hydra" / name
        record.write_text(record.read_text() + line)
    kd("train-student", f"resume={run_dir}")
    assert (run_dir / "metrics.json").exists()


# ---- values that make no sense are refused before any folder exists -----------------------------

@pytest.mark.parametrize("args, says", [
    (["distill", "T=1e6"], "T must be a number in [0.01, 1000]"),
    (["distill", "T=inf"], "T must be"),
    (["distill", "T=1e-200"], "T must be"),
    (["distill", "lr=nan"], "lr must be a finite number > 0"),
    (["train-student", "seed=18446744073709551616"], "seed must be an integer in 0.."),
    (["train-student", "seed=-1"], "seed must be"),
    (["train-student", "data.train_limit=100", "data.val_size=100"], "leaves no training images of data.train_limit=100"),
    (["train-student", "model.hidden=[true]"], "model.hidden must be a list of layer widths"),
    (["train-student", "model.hidden=[]"], "model.hidden must be"),
    (["train-student", "model.hidden=[16,0]"], "model.hidden must be"),
    (["train-student", "optim.weight_decay=-1"], "optim.weight_decay must be a finite number >= 0"),
    (["train-student", "optim.warmup_epochs=abc"], "optim.warmup_epochs must be"),
    (["train-student", "eval_batch_size=0"], "eval_batch_size must be an integer >= 1"),
    (["train-student", "batch_size=0"], "batch_size must be an integer >= 1"),
    (["train-student", "eval_every=0"], "eval_every must be an integer >= 1"),
    (["distill", "sgd_update=adam"], "sgd_update must be one of"),
    (["train-teacher", "model.max_norm=-2"], "model.max_norm must be"),
    (["distill", "data.elastic.scale=-1"], "data.elastic.scale must be a number in [0, 200]"),
    (["train-student", "data.elastic.sigma=0"], "data.elastic.sigma must be a number in [0.1, 28]"),
    (["train-student", "data.elastic.sigma=1e9"], "data.elastic.sigma must be a number in [0.1, 28]"),
    (["train-student", "data.elastic=34"], "data.elastic must be a map of scale and sigma"),
    (["train-student", "data.elastic=null"], "data.elastic must be a map of scale and sigma"),
    # a preset brings recipe=paper: a teacher would silently train 20 epochs of the student's recipe
    (["train-teacher", "experiment=omit3"], "presets (conf/experiment/) are transfer sets for a student"),
    (["train-specialists", "experiment=only78"], "presets (conf/experiment/) are transfer sets for a student"),
    (["evaluate", "checkpoint=x.pt", "bias_shift={3:nan}"], "bias_shift must be null or a map from digits to finite numbers"),
    (["evaluate", "checkpoint=x.pt", "fit_bias=[11]"], "fit_bias must be a list of digits"),
    # a sweep of no job: Hydra's own answer was an IndexError
    (["distill", "-m", "T=glob(*)"], "T=glob(*) gives no value to run: glob() picks among a config group's"),
    (["distill", "-m", "recipe=glob(zz*)"], "recipe=glob(zz*) gives no value to run"),
    (["train-student", "-m", "seed=range(0)"], "seed=range(0) gives no value to run"),
])
def test_a_meaningless_value_is_refused_before_any_folder(kd, args, says):
    refused(kd(*args, check=False), says)
    assert not (kd.cwd / "outputs").exists()


def test_an_empty_range_is_not_told_about_glob(kd):
    proc = kd("train-student", "-m", "seed=range(0)", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "kd: error: seed=range(0) gives no value to run"


@pytest.fixture
def finished_student(kd):
    kd("train-student", *SMALL, "epochs=1", f"hydra.run.dir={kd.cwd / 's'}")
    return kd.cwd / "s" / "checkpoint.pt"


def altered(path, out, change):
    ckpt = load_checkpoint(path)
    change(ckpt)
    save_checkpoint(out, {k: v for k, v in ckpt.items() if k != "format_version"})
    return out


@pytest.mark.parametrize("damage, says", [
    (lambda c: c["state_dict"]["out.weight"].view(-1)[3].fill_(float("nan")), "non-finite weights"),
    (lambda c: c["state_dict"]["hidden.0.bias"].view(-1)[1].fill_(-float("inf")), "non-finite weights"),
    (lambda c: c.update(arch={"hidden": "800"}), "malformed architecture"),
    (lambda c: c["arch"].update(in_features="784"), "malformed architecture"),
    (lambda c: c.update(config=[1, 2]), "malformed config"),
    (lambda c: c.update(metrics="many"), "malformed metrics"),
])
def test_a_damaged_model_is_refused_as_checkpoint_and_as_teacher(kd, finished_student, damage, says):
    bad = altered(finished_student, kd.cwd / "bad.pt", damage)
    refused(kd("evaluate", f"checkpoint={bad}", check=False), says)
    refused(kd("distill", f"teacher={bad}", *SMALL, "epochs=1", check=False), says)


def test_a_resumable_state_is_not_a_model(kd):
    run = kd.cwd / "stopped"
    kd("train-teacher", *SMALL, "epochs=2", f"hydra.run.dir={run}", extra_env=stop_at(2, 1), check=False)
    refused(kd("evaluate", f"checkpoint={run / 'state.pt'}", check=False), "resumable state", f"resume={run}")
    refused(kd("distill", f"teacher={run / 'state.pt'}", *SMALL, "epochs=1", check=False), "resumable state")


def test_a_diverged_run_says_why_and_leaves_nothing_to_resume(kd):
    run = kd.cwd / "diverged"  # epoch 1 trains (and saves its state); lr x 1e12 from epoch 2
    proc = kd("train-student", *SMALL, "epochs=3", "optim.schedule=exponential", "optim.lr_decay=1e12",
              f"hydra.run.dir={run}", check=False)
    refused(proc, "diverged at epoch 2", "lower lr")
    assert not (run / "state.pt").exists() and not (run / "checkpoint.pt").exists()
    assert "diverged" in (run / "error.txt").read_text()
    refused(kd("train-student", f"resume={run}", check=False), "no state.pt", "diverged")


def test_a_run_whose_last_step_blows_up_reports_no_number(kd):
    # one step an epoch; the lr x 1e30 of epoch 2 leaves finite weights whose outputs are not: the
    # loss, computed before that step, was finite, so only the model's outputs can tell
    run = kd.cwd / "blown"
    proc = kd("train-student", "model.hidden=[16]", "data.train_limit=100", "batch_size=100", "epochs=2",
              "optim.schedule=exponential", "optim.lr_decay=1e30", f"hydra.run.dir={run}", check=False)
    refused(proc, "diverged at epoch 2", "NaN or infinite", "lower lr")
    assert "test errors:" not in proc.stdout
    assert not any((run / f).exists() for f in ("metrics.json", "checkpoint.pt", "state.pt"))


def test_a_model_whose_outputs_overflow_is_not_counted(kd, finished_student):
    # finite weights (they pass the checkpoint's check) whose products overflow float32
    bad = altered(finished_student, kd.cwd / "huge.pt", lambda c: c["state_dict"]["out.weight"].fill_(3e38))
    assert torch.isfinite(load_checkpoint(bad)["state_dict"]["out.weight"]).all()
    out = kd.cwd / "e"
    refused(kd("evaluate", f"checkpoint={bad}", f"hydra.run.dir={out}", check=False), "NaN or infinite")
    assert not (out / "metrics.json").exists()


# ---- writes that fail ----------------------------------------------------------------------------

class FullDisk:
    """A file whose writes fail with ENOSPC after a few bytes, as on a full disk."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        room = 100 - self.written
        if len(data) > room:
            self.f.write(data[:max(room, 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def disk_full_at(monkeypatch):
    """disk_full_at("state.pt", after=1): the 2nd and later writes of state.pt fail."""
    def arm(name, after=0):
        real, count = os.fdopen, [0]

        def fdopen(fd, *args, **kwargs):
            f = real(fd, *args, **kwargs)
            if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(name + "."):
                count[0] += 1
                if count[0] > after:
                    return FullDisk(f)
            return f

        monkeypatch.setattr(os, "fdopen", fdopen)
    return arm


@pytest.mark.parametrize("target, after", [("state.pt", 1), ("checkpoint.pt", 0), ("metrics.json", 0)])
def test_a_full_disk_is_one_line_and_loses_nothing(kd, disk_full_at, target, after):
    run = kd.cwd / "run"
    disk_full_at(target, after)
    proc = kd("train-student", *SMALL, "epochs=3", f"hydra.run.dir={run}", check=False)
    refused(proc, f"could not write {run / target}", "No space left on device")
    assert not list(run.glob("*.tmp")) and not (run / "metrics.json").exists()
    state = load_checkpoint(run / "state.pt")  # the last good state, whole
    assert state["epoch"] == (1 if target == "state.pt" else 3)


def test_a_run_removes_the_temporary_files_a_kill_left(kd):
    run = kd.cwd / "stopped"
    kd("train-student", *SMALL, "epochs=2", f"hydra.run.dir={run}", extra_env=stop_at(2, 1), check=False)
    (run / "state.pt.k3j2.tmp").write_bytes(b"half a state")
    (run / "checkpoint.pt.x9.tmp").write_bytes(b"half a checkpoint")
    kd("train-student", f"resume={run}")
    assert not list(run.glob("*.tmp")) and (run / "metrics.json").exists()


def test_a_second_ctrl_c_never_cuts_a_save_in_half(kd, monkeypatch):
    from kd_cli import train

    real = train.save_checkpoint

    def save_with_two_ctrl_c(path, payload, durable=True):
        signal.raise_signal(signal.SIGINT)  # the first asks to stop, the second would stop at once
        signal.raise_signal(signal.SIGINT)
        return real(path, payload, durable)

    monkeypatch.setattr(train, "save_checkpoint", save_with_two_ctrl_c)
    run = kd.cwd / "run"
    proc = kd("train-student", *SMALL, "epochs=3", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 130 and "state saved" in proc.stderr and "Traceback" not in proc.stderr
    state = load_checkpoint(run / "state.pt")  # whole, and where the stop was asked for
    assert (state["epoch"], state["step"]) == (1, 0)
    monkeypatch.setattr(train, "save_checkpoint", real)
    kd("train-student", f"resume={run}")
    kd("train-student", *SMALL, "epochs=3", f"hydra.run.dir={kd.cwd / 'whole'}")
    assert json.loads((run / "metrics.json").read_text())["history"] == \
        json.loads((kd.cwd / "whole" / "metrics.json").read_text())["history"]


def test_ctrl_c_in_train_specialists_is_one_line(kd):
    kd("train-teacher", *SMALL, "epochs=1", f"hydra.run.dir={kd.cwd / 'g'}")
    proc = kd("train-specialists", f"generalist={kd.cwd / 'g' / 'checkpoint.pt'}", "clusters=3", "epochs=2",
              extra_env=stop_at(1, 2), check=False)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("kd: error:")]
    assert proc.returncode == 130 and len(lines) == 1 and "run it again" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---- sweeps and reports never lose a job -----------------------------------------------------------

def test_a_job_that_crashes_is_a_failed_row_and_the_sweep_goes_on(kd, monkeypatch):
    from kd_cli import stages

    real = stages.STAGES["train-student"]

    def crash_on_seed_1(cfg, out_dir):
        if cfg.seed == 1:
            raise RuntimeError("a bug in a stage")
        return real(cfg, out_dir)

    monkeypatch.setitem(stages.STAGES, "train-student", crash_on_seed_1)
    sweep = kd.cwd / "sweep"
    proc = kd("train-student", "-m", "seed=0,1,2", *SMALL, "epochs=1", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "RuntimeError: a bug in a stage" in proc.stderr
    assert "3 jobs: 2 done, 1 failed" in (sweep / "report.md").read_text()


def test_report_shows_damaged_jobs_as_rows(kd):
    sweep = kd.cwd / "sweep"
    kd("train-student", "-m", "seed=0,1,2", *SMALL, "epochs=1", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    (jobs[0] / "metrics.json").write_text('{"test_err')  # cut short
    (jobs[1] / ".hydra" / "overrides.yaml").write_text("[unclosed")
    proc = kd("report", str(sweep))
    assert "3 jobs: 1 done, 2 unreadable" in proc.stdout
    assert "metrics.json: JSONDecodeError" in proc.stdout and "overrides.yaml" in proc.stdout
    (kd.cwd / "a-file").write_text("x")
    refused(kd("report", str(sweep), "--out", str(kd.cwd / "a-file"), check=False), "is a file")


def test_a_folder_it_cannot_write_in_is_refused_before_hydra_makes_it(kd, monkeypatch):
    from kd_cli import run

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run.tempfile, "mkstemp", read_only)
    refused(kd("train-student", *SMALL, f"hydra.run.dir={kd.cwd / 'ro' / 'run'}", check=False),
            "cannot write in", "Read-only file system", "choose a writable hydra.run.dir")
    assert not (kd.cwd / "ro").exists()


# ---- a key the run would ignore ----------------------------------------------------------------

def test_a_key_the_run_would_ignore_is_refused_before_any_folder_and_its_use_is_not(kd):
    kd("train-teacher", *SMALL, "epochs=1", f"hydra.run.dir={kd.cwd / 't'}")
    t = kd.cwd / "t" / "checkpoint.pt"
    student, where = [*SMALL, "epochs=1"], ["hydra.run.dir=x", "hydra.sweep.dir=y"]
    for args, says in [
        (["train-student", "-m", "recipe=paper", "T=2,20", *student], "T is read by kd distill only"),
        (["train-teacher", "recipe=elastic", *student], "recipe=elastic is a distillation recipe"),
        (["train-specialists", f"generalist={t}", "recipe=paper", "T=7"], "T is read by kd distill only"),
        (["train-student", "+alpha=0.5", *student], "alpha is read by kd distill only"),
        (["distill", f"teacher={t}", "+fit_bias=[3]", *student], "fit_bias is read by kd evaluate only"),
        (["evaluate", f"checkpoint={t}", "+epochs=5"], "kd evaluate does not read epochs"),
        (["distill", "-m", f"teacher={t}", "loss=logit_mse", "T=2,5", *student], "loss=logit_mse matches logits"),
        (["distill", "-m", f"teacher={t}", "alpha=1", "T=2,5", *student], "alpha=1 gives the soft targets weight 0"),
        (["distill", f"teacher=[{t},{t}]", "loss=logit_mse", "teacher_combine=geometric", *student],
         "loss=logit_mse matches the teachers' mean logit"),
        (["train-student", "-m", "recipe=student,paper", *student], "recipe=paper is a distillation recipe"),
        (["distill", f"teacher={t}", "teacher_combine=geometric", *student], "an ensemble's teachers, and there is one"),
        (["evaluate", f"checkpoint={t}", "combine=geometric"], "an ensemble's checkpoints, and there is one"),
        (["train-student", "optim.lr_decay=0.5", *student], "only optim.schedule=exponential reads it"),
        (["train-student", "optim.momentum_start=0.1", *student], "optim.momentum_ramp_epochs > 0"),
        (["train-student", "data.elastic.sigma=10", *student], "data.elastic.scale is 0"),
    ]:
        refused(kd(*args, *where, check=False), says)
        assert not (kd.cwd / "x").exists() and not (kd.cwd / "y").exists(), args
    for n, args in enumerate([["train-student", "experiment=little_data", "data.val_size=100", *student],  # its T: exp. 3
                              ["distill", f"teacher=[{t},{t}]", "teacher_combine=geometric", *student],
                              ["evaluate", f"checkpoint=[{t},{t}]", "combine=geometric"],
                              ["train-student", "optim.schedule=exponential", "optim.lr_decay=0.5", *student],
                              ["train-student", "optim.momentum_ramp_epochs=1", "optim.momentum_start=0.5", *student],
                              ["train-student", "data.elastic.scale=2", "data.elastic.sigma=3", *student],
                              # a key some jobs read and others ignore: the others' settings, not the key, vary
                              ["distill", "-m", f"teacher={t}", "alpha=0.5,1", "T=2", *student],
                              ["distill", "-m", f"teacher={t}", "loss=kd,logit_mse", "T=2", *student]]):
        kd(*args, f"hydra.run.dir={kd.cwd / 'ok' / str(n)}", f"hydra.sweep.dir={kd.cwd / 'oks' / str(n)}")
    # a run begun before a check refused its command (played by its record) still resumes: it goes on as it began
    stopped = kd.cwd / "stopped"
    kd("distill", f"teacher={t}", "alpha=1", *SMALL, "epochs=2", f"hydra.run.dir={stopped}",
       extra_env=stop_at(2, 1), check=False)
    record = stopped / ".hydra" / "overrides.yaml"
    record.write_text(record.read_text() + "- T=5.0\n")
    kd("distill", f"resume={stopped}")
    assert (stopped / "metrics.json").is_file()
    # a run's folder that has not finished is no teacher (not its job folders either)
    refused(_unfinished_teacher(kd, t, student), "is a run that has not finished")


def _unfinished_teacher(kd, t, student):
    folder = kd.cwd / "unfinished"
    kd("train-teacher", *SMALL, "epochs=2", f"hydra.run.dir={folder}", extra_env=stop_at(2, 1), check=False)
    kd("distill", f"teacher={t}", *student, f"hydra.run.dir={folder / 'student'}")  # a student kept inside it
    return kd("distill", f"teacher={folder}", *student, check=False)


def test_a_preset_that_would_override_a_typed_recipe_or_a_stage_that_would_half_apply_one_is_refused(kd):
    kd("train-teacher", *SMALL, "epochs=1", f"hydra.run.dir={kd.cwd / 't'}")
    t = kd.cwd / "t" / "checkpoint.pt"
    for args, says in ((["distill", f"teacher={t}", "experiment=only78", "recipe=distill"],
                        "experiment=only78 sets epochs over recipe=distill's"),
                       (["distill", f"teacher={t}", "experiment=little_data", "recipe=distill"], "sets epochs, lr over"),
                       (["train-specialists", f"generalist={t}", "recipe=teacher"], "would apply only in part")):
        refused(kd(*args, "hydra.run.dir=x", check=False), says)
        assert not (kd.cwd / "x").exists()
    # the recipe's keys typed too, or a preset that sets none of them: as typed
    kd("distill", f"teacher={t}", "experiment=only78", "recipe=distill", "epochs=1", "data.val_size=100", *SMALL,
       f"hydra.run.dir={kd.cwd / 'a'}")
    kd("distill", f"teacher={t}", "experiment=omit3", "recipe=elastic", "epochs=1", "data.val_size=100", *SMALL,
       f"hydra.run.dir={kd.cwd / 'b'}")
    assert json.loads((kd.cwd / "b" / "metrics.json").read_text())["T"] == 5  # recipe=elastic's, not the preset's 20


def test_a_download_that_fails_is_refused_before_any_run_folder_and_leaves_no_folder_of_its_own(kd, monkeypatch):
    import torchvision.datasets

    tried = []

    def offline(root, train, download):  # what torchvision does with no internet: make the folder, then fail
        tried.append(root)
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    empty = kd.cwd / "nowhere"
    proc = kd("train-student", *SMALL, "epochs=1", f"data.root={empty}", "data.download=true", "hydra.run.dir=x",
              check=False)
    refused(proc, "could not download MNIST into", "set KD_DATA_ROOT")
    assert tried and not empty.exists() and not (kd.cwd / "x").exists()
