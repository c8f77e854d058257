"""Sweeps: the basic, joblib and submitit-local launchers give the same per-job results; a failed
job keeps the others' results; `kd report` lists every job and plots test errors vs T."""
import csv
import json
import re
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kd_cli.cli import _share_cores, threads_per_job
from kd_cli.report import report, seed_groups

SMALL = ["model.hidden=[16]", "epochs=2", "batch_size=50"]


def jobs_of(sweep):
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


def results(sweep):
    """Per job (by its overrides): test errors and the per-epoch history."""
    out = {}
    for job in jobs_of(sweep):
        if (job / "metrics.json").exists():
            m = json.loads((job / "metrics.json").read_text())
            out[job.name.split("_", 1)[1]] = (m["test_errors"], [(h["epoch"], h["test_errors"]) for h in m["history"]])
    return out


@pytest.fixture
def teacher(kd):
    kd("train-teacher", "model.hidden=[32]", "epochs=1", f"hydra.run.dir={kd.cwd / 'teacher'}")
    return kd.cwd / "teacher" / "checkpoint.pt"


@pytest.mark.subprocess
def test_basic_and_joblib_sweeps_agree_and_a_failed_job_loses_nothing(kd, teacher):
    # lr x 1e30 from epoch 2 diverges: a failure only training finds (a missing teacher is refused
    # before the sweep starts)
    sweep_args = ["distill", "-m", "T=2,5", "optim.lr_decay=1,1e30", "optim.schedule=exponential", f"teacher={teacher}",
                  *SMALL]
    sweeps = {}
    for launcher in ("basic", "joblib"):
        sweeps[launcher] = kd.cwd / launcher
        extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
        run = kd.process if launcher == "joblib" else kd  # joblib's workers: a real process tree
        proc = run(*sweep_args, *extra, f"hydra.sweep.dir={sweeps[launcher]}", check=False)
        assert proc.returncode == 1, proc.stderr  # two jobs failed ...
        assert "2 job(s) of the sweep failed" in proc.stderr and "diverged at epoch 2" in proc.stderr
        assert len(jobs_of(sweeps[launcher])) == 4
        assert len(results(sweeps[launcher])) == 2  # ... and the other two finished
        assert (sweeps[launcher] / "report.md").is_file()  # written when the sweep ended
    assert results(sweeps["basic"]) == results(sweeps["joblib"])
    # each joblib job had its share of the cores, recorded beside its result (threads change
    # float rounding at MNIST size; this tiny model is below where torch splits its work)
    for launcher, threads in (("basic", torch.get_num_threads()), ("joblib", max(1, len(os.sched_getaffinity(0)) // 2))):
        assert {json.loads((job / "metrics.json").read_text())["threads"] for job in jobs_of(sweeps[launcher])
                if (job / "metrics.json").exists()} == {threads}

    text = report([sweeps["joblib"]])
    for job in jobs_of(sweeps["joblib"]):
        assert job.name in text
    rows = list(csv.DictReader(open(sweeps["joblib"] / "report.csv")))
    assert len(rows) == 4 and {r["T"] for r in rows} == {"2", "5"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("diverged at epoch 2" in r["error"] for r in failed)
    assert all(r["test_errors"].isdigit() for r in rows if r["status"] == "done")
    assert (sweeps["joblib"] / "report.png").stat().st_size > 1000


def test_side_by_side_jobs_split_the_cores_this_process_may_use_not_the_machines(monkeypatch):
    """In a cpuset that allows 4 of a machine's 16 cores, 2 joblib jobs get 2 threads each (8
    each would put 16 threads on 4 cores); n_jobs=-1 (a job per core) gets 1; the basic launcher
    leaves torch's threads alone."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    before = torch.get_num_threads()
    try:
        seen = []
        for launcher in ({"n_jobs": 2}, {"n_jobs": 3}, {"n_jobs": -1}, {}):
            torch.set_num_threads(7)
            _share_cores(OmegaConf.create({"launcher": launcher}))
            seen.append(torch.get_num_threads())
        assert seen == [2, 1, 1, 7]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cores, n_jobs, threads", [(4, 2, 2), (4, 3, 1), (4, 8, 1), (7, 2, 3), (16, 3, 5), (1, 2, 1)])
def test_threads_per_job_is_an_equal_whole_share_of_the_allowed_cores_and_at_least_one(monkeypatch, cores, n_jobs,
                                                                                      threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads_per_job(n_jobs) == threads


def test_report_of_a_seed_sweep_gives_mean_and_spread_and_names_unfinished_jobs(kd, teacher):
    sweep = kd.cwd / "seeds"
    kd("distill", "-m", "seed=0,1,2", "T=2,5", f"teacher={teacher}", *SMALL, f"hydra.sweep.dir={sweep}")
    (jobs_of(sweep)[0] / "metrics.json").unlink()  # as if killed before it finished
    (jobs_of(sweep)[0] / "state.pt").write_bytes(b"")
    proc = kd("report", str(sweep))
    assert "Over seeds:" in proc.stdout and "stopped" in proc.stdout
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert len(rows) == 6 and sum(r["status"] == "stopped" for r in rows) == 1
    done = [int(r["test_errors"]) for r in rows if r["status"] == "done" and r["T"] == "5"]
    assert f"| 5 | 3 | {sum(done) / 3:.1f} |" in proc.stdout  # T=5: three seeds, their mean
    assert (sweep / "report.png").is_file()
    assert (sweep / "curves.png").stat().st_size > 1000 and "![learning curves](curves.png)" in proc.stdout


def test_seed_groups_give_the_mean_and_sample_spread_of_each_setting():
    rows = [{"status": "done", "values": {"T": t, "seed": str(i)}, "test_errors": e}
            for t, errs in (("2", [1, 2, 6]), ("5", [4, 4])) for i, e in enumerate(errs)]
    rows.append({"status": "failed", "values": {"T": "5", "seed": "2"}, "test_errors": None})
    groups = {g["values"]["T"]: g for g in seed_groups(rows, ["T", "seed"])}
    # seeds 1, 2, 6: mean 3, sample variance ((-2)^2 + (-1)^2 + 3^2) / (3 - 1) = 7
    summary = {k: v for k, v in groups["2"].items() if k != "rows"}
    assert summary == {"values": {"T": "2"}, "n": 3, "launched": 3, "mean": 3, "std": pytest.approx(7 ** 0.5), "min": 1, "max": 6}
    assert [r["test_errors"] for r in groups["2"]["rows"]] == [1, 2, 6]
    assert (groups["5"]["n"], groups["5"]["launched"]) == (2, 3)  # the failed seed counts as launched, not in the mean
    assert groups["5"]["n"] == 2 and groups["5"]["mean"] == 4 and groups["5"]["std"] == 0


def drawn(monkeypatch, draw, *args):
    """What a plotting function handed matplotlib: (method, x, y, yerr) of each errorbar and plot."""
    from matplotlib.axes import Axes

    calls = []
    for name in ("errorbar", "plot"):
        real = getattr(Axes, name)

        def spy(self, x, y, *more, _name=name, _real=real, **kw):
            calls.append((_name, list(x), list(y), kw.get("yerr")))
            return _real(self, x, y, *more, **kw)
        monkeypatch.setattr(Axes, name, spy)
    assert draw(*args)
    return calls


def test_the_plots_draw_the_numbers_of_the_runs(tmp_path, monkeypatch):
    """report.png: the mean over seeds against T, bars from min to max; curves.png: each run's loss
    over its trained epochs and its test and validation errors over every epoch, as recorded."""
    from kd_cli.plots import learning_curves, plot

    rows = [{"status": "done", "values": {"T": t, "seed": str(i)}, "test_errors": e}
            for t, errs in (("5", [4, 4]), ("2", [1, 2, 6])) for i, e in enumerate(errs)]
    calls = drawn(monkeypatch, plot, tmp_path / "report.png", rows, ["T", "seed"])
    # T=2: seeds 1, 2, 6 (mean 3, bars 2 below, 3 above); T=5: 4, 4
    assert calls == [("errorbar", [2.0, 5.0], [3, 4], [[2, 0], [3, 0]])]
    history = [{"epoch": 0, "test_errors": 50, "val_errors": 55},
               {"epoch": 1, "loss": 0.5, "test_errors": 20, "val_errors": 22},
               {"epoch": 2, "loss": 0.25, "test_errors": 10, "val_errors": 12}]
    runs = [{"status": "done", "job": "sweep/0_T=2", "values": {"T": "2"}, "history": history}]
    calls = drawn(monkeypatch, learning_curves, tmp_path / "curves.png", runs, ["T"])
    assert calls == [("plot", [1, 2], [0.5, 0.25], None), ("plot", [0, 1, 2], [50, 20, 10], None),
                     ("plot", [0, 1, 2], [55, 22, 12], None)]


def test_report_needs_runs(kd):
    proc = kd("report", str(kd.cwd), check=False)
    assert proc.returncode == 2 and "no kd runs" in proc.stderr


@pytest.mark.subprocess
def test_submitit_local_launcher_runs_the_same_jobs(kd):
    basic, local = kd.cwd / "basic", kd.cwd / "submitit"
    args = ["train-student", "-m", "seed=0,1", *SMALL]
    kd(*args, f"hydra.sweep.dir={basic}")
    kd.process(*args, "hydra/launcher=submitit_local", f"hydra.sweep.dir={local}")
    assert len(results(local)) == 2 and results(local) == results(basic)


def test_report_axes_come_from_what_each_job_ran_not_only_what_was_typed(kd, teacher):
    """recipe=distill,paper sweeps T (5 and 20) without T being typed: it is still an axis."""
    sweep = kd.cwd / "recipes"
    kd("distill", "-m", "recipe=distill,paper", f"teacher={teacher}", *SMALL, f"hydra.sweep.dir={sweep}")
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert sorted((r["recipe"], float(r["T"]), r["data.jitter"]) for r in rows) == [("distill", 5, "2"),
                                                                                     ("paper", 20, "0")]
    assert "epochs" not in rows[0]  # typed once for both jobs: not an axis
    assert (sweep / "report.png").is_file()  # drawn against T


def test_a_job_that_failed_after_saving_a_state_is_failed_with_its_error(tmp_path):
    # a resume that failed (a full disk at the finish) leaves both state.pt and error.txt: the row
    # must say failed and why, not "stopped" with a resume hint that would fail again
    from kd_cli.jobs import read_job

    job = tmp_path / "0_seed=0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (job / "state.pt").write_bytes(b"state")
    (job / "error.txt").write_text("Traceback ...\nkd: error: could not write checkpoint.pt: No space left on device\n")
    row = read_job(job)
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    (job / "error.txt").unlink()
    assert read_job(job)["status"] == "stopped"
    # an attempt that failed, then one that ran again and was stopped: the log keeps the first one's
    # ERROR line, error.txt is gone (removed when it ran again), and the job is stopped, not failed
    (job / "train-student.log").write_text("[2026-12-05 10:00:00][kd][ERROR] - job 0 failed: out of memory\n")
    assert read_job(job)["status"] == "stopped"
    (job / "state.pt").unlink()  # nothing to resume: the log's error is the last word
    row = read_job(job)
    assert row["status"] == "failed" and "out of memory" in row["error"]


def finished_job(folder, overrides, config, metrics):
    """A job folder as a finished run leaves it: its Hydra record and its metrics.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (folder / "metrics.json").write_text(json.dumps({"test_error_rate": metrics["test_errors"] / 200, **metrics}))


def test_best_by_validation_is_the_setting_whose_seeds_do_best_not_one_lucky_seed(tmp_path):
    # T=2: one lucky seed (10 validation errors) and a bad one (mean 20); T=5: 15 and 16 (mean 15.5)
    for num, (t, seed, val, test) in enumerate([(2, 0, 10, 30), (2, 1, 30, 50), (5, 0, 15, 40), (5, 1, 16, 44)]):
        finished_job(tmp_path / f"{num}_T={t},seed={seed}", [f"T={t}", f"seed={seed}"], {"T": t, "seed": seed},
                     {"test_errors": test, "val_errors": val, "val_size": 1000})
    text = report([tmp_path])
    assert "Best by validation: 2, 3 (`T=5`), 15.5 validation errors over its 2 runs; their mean **42.0 test " \
           "errors**" in text, text


def test_best_by_validation_compares_error_rates_and_says_when_settings_tie(tmp_path):
    # 10 of 1,000 (1%) beats 8 of 100 (8%); two settings at 1% tie: the test set may not break it
    for num, (lr, val, size) in enumerate([(0.1, 8, 100), (0.2, 10, 1000), (0.3, 1, 100)]):
        finished_job(tmp_path / f"{num}_lr={lr}", [f"lr={lr}"], {"lr": lr},
                     {"test_errors": 20 + num, "val_errors": val, "val_size": size})
    text = report([tmp_path])
    assert "Best by validation: 1 (`lr=0.2`), 10 validation errors; its **21 test errors**" in text, text
    assert "tied on validation with `lr=0.3`" in text


def test_seeds_group_by_what_ran_typed_numbers_or_recipes_alike_and_never_across_stages(tmp_path):
    # T=5 and T=5.0 are one setting; a hard-label student (no T, its own stage)
    # and a distilled one are not seeds of one setting, nor are runs on different data
    same = {"stage": "distill", "data_sha256": "a" * 64, "precision": "bf16", "threads": 2}
    finished_job(tmp_path / "0_T=5", ["T=5", "seed=0"], {"T": 5, "seed": 0}, {"test_errors": 10, **same})
    finished_job(tmp_path / "1_T=5.0", ["T=5.0", "seed=1"], {"T": 5.0, "seed": 1}, {"test_errors": 20, **same})
    finished_job(tmp_path / "2_seed=0", ["seed=0"], {"seed": 0},
                 {"test_errors": 100, "stage": "train-student", "data_sha256": "a" * 64})
    finished_job(tmp_path / "3_T=5", ["T=5", "seed=2"], {"T": 5, "seed": 2},
                 {"test_errors": 40, "stage": "distill", "data_sha256": "b" * 64})
    finished_job(tmp_path / "4_seed=1", ["seed=1"], {"seed": 1},  # its config keys are a student's
                 {"test_errors": 70, "stage": "train-teacher", "data_sha256": "a" * 64})
    # records with no stage: a key that one config has and the other lacks still tells them apart
    finished_job(tmp_path / "5_seed=0", ["seed=0"], {"seed": 0, "alpha": 0.5}, {"test_errors": 1000})
    finished_job(tmp_path / "6_seed=1", ["seed=1"], {"seed": 1}, {"test_errors": 2000})
    # the same command in another precision, or at another thread count: other float rounding
    finished_job(tmp_path / "7_T=5", ["T=5", "seed=3"], {"T": 5, "seed": 3},
                 {"test_errors": 3000, **same, "precision": "fp32"})
    finished_job(tmp_path / "8_T=5", ["T=5", "seed=4"], {"T": 5, "seed": 4},
                 {"test_errors": 4000, **same, "threads": 1})
    from kd_cli.jobs import rows_of
    from kd_cli.report import swept_keys

    rows = rows_of([tmp_path])
    swept, _ = swept_keys(rows)
    groups = sorted((g["n"], g["mean"]) for g in seed_groups(rows, swept))
    assert groups == [(1, 40), (1, 70), (1, 100), (1, 1000), (1, 2000), (1, 3000), (1, 4000), (2, 15)], (swept, groups)


def test_the_table_shortens_searched_floats_but_never_integers():
    from kd_cli.report import _short

    assert _short("0.0909812345") == "0.09098" and _short("123456789") == "123456789" and _short("-20") == "-20"


def test_report_of_a_folder_of_sweeps_lists_each_sweeps_jobs_not_started_too(kd, tmp_path, tiny_root):
    # two sweeps in one folder, each stopped before its second job; one names its job folders by
    # a custom hydra.sweep.subdir: every launched job is a row, none twice, none invented
    parent = tmp_path / "studies"
    for name, subdir in (("a", []), ("b", ["hydra.sweep.subdir=run${hydra.job.num}"])):
        kd("train-student", "-m", "seed=0,1", *SMALL, f"data.root={tiny_root}", f"hydra.sweep.dir={parent / name}",
           *subdir, extra_env={"KD_TEST_SIGNAL_AT": "SIGINT@2:0"}, check=False)
    assert (parent / "b" / "run0" / ".hydra").is_dir()
    report([parent])
    rows = list(csv.DictReader(open(parent / "report.csv")))
    assert sorted((Path(r["job"]).parent.name, r["status"]) for r in rows) == [
        ("a", "not started"), ("a", "stopped"), ("b", "not started"), ("b", "stopped")], rows
    # named as Hydra would have named it: sorted, without the excluded path (data.root)
    assert (parent / "a" / "1_batch_size=50,epochs=2,model.hidden=[16],seed=1").as_posix() in {r["job"] for r in rows}


def test_of_settings_tied_on_validation_the_first_jobs_is_quoted_not_the_first_in_text_order(tmp_path):
    # T=2 is job 0 and T=10 job 1, both 20 of 1,000 on validation: "10.0" sorts before "2.0" as text
    for num, t in enumerate([2.0, 10.0]):
        finished_job(tmp_path / f"{num}_T={t}", [f"T={t}"], {"T": t},
                     {"test_errors": 40 + num, "val_errors": 20, "val_size": 1000})
    text = report([tmp_path])
    assert "Best by validation: 0 (`T=2.0`), 20 validation errors; its **40 test errors**" in text, text
    assert "tied on validation with `T=10.0`" in text


def test_a_training_runs_history_and_curves_follow_eval_every_and_its_weights_do_not(kd, tmp_path):
    from kd_cli.checkpoint import load_checkpoint

    for every in (1, 2):
        proc = kd("train-student", *SMALL, "epochs=3", f"eval_every={every}", f"hydra.run.dir={tmp_path / str(every)}")
    history = json.loads((tmp_path / "2" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history if "test_errors" in h] == [0, 2, 3]
    # the progress bar keeps showing the latest count in the epochs that count none (epoch 1)
    counted = {h["epoch"]: h["test_errors"] for h in history if "test_errors" in h}
    # the bar's (test_errors, loss) after each epoch; on a busy CPU tqdm may draw a line twice
    drawn = re.findall(r"test_errors=(\d+), loss=([\d.e+-]+)", proc.stderr)
    shown = [errors for n, (errors, loss) in enumerate(drawn) if n == 0 or drawn[n - 1] != (errors, loss)]
    assert shown[:3] == [str(counted[0]), str(counted[2]), str(counted[3])], proc.stderr  # after epochs 1, 2, 3
    assert [h["epoch"] for h in history if "loss" in h] == [1, 2, 3]
    a, b = (load_checkpoint(tmp_path / str(every) / "checkpoint.pt")["state_dict"] for every in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the real evaluation, every epoch or not, changes nothing
    report([tmp_path / "2"])
    assert (tmp_path / "2" / "curves.png").stat().st_size > 1000


def test_a_glob_sweep_of_a_config_group_runs_and_continues(kd, teacher):
    # glob() lists a config group's options: preflight reads it as Hydra's sweeper does
    sweep = kd.cwd / "glob"
    args = ["distill", "-m", "recipe=glob(pa*)", f"teacher={teacher}", *SMALL, f"hydra.sweep.dir={sweep}"]
    kd(*args)
    (job,) = jobs_of(sweep)
    assert "recipe=paper" in job.name and (job / "metrics.json").is_file()
    again = kd(*args)  # the same sweep into its folder: kept, not run again
    assert "finished before; kept as it is" in again.stdout


def test_a_typed_map_is_one_axis_of_the_report_not_two(tmp_path):
    # bias_shift={3:3.5} typed, and bias_shift.3: 3.5 in the job's config: one swept column
    for num, shift in enumerate([3.5, 2.0]):
        finished_job(tmp_path / f"{num}_bias_shift={{3:{shift}}}", [f"bias_shift={{3:{shift}}}"],
                     {"bias_shift": {3: shift}}, {"test_errors": 10 + num})
    from kd_cli.jobs import rows_of
    from kd_cli.report import swept_keys

    swept, _ = swept_keys(rows_of([tmp_path]))
    assert swept == ["bias_shift.3"], swept


def test_a_report_of_several_stages_compares_keys_within_a_stage(tmp_path):
    # two distillations at T=2 and T=5 and an evaluation: T is an axis, the evaluation's
    # checkpoint= and the distillations' training keys are not (each stage lacks the other's keys)
    for num, t in enumerate([2, 5]):
        finished_job(tmp_path / f"d{num}", [f"T={t}", "epochs=3"], {"T": t, "epochs": 3, "lr": 0.05},
                     {"test_errors": 10 + num, "stage": "distill"})
    finished_job(tmp_path / "e", ["checkpoint=d0/checkpoint.pt"], {"checkpoint": "d0/checkpoint.pt", "fit_bias": []},
                 {"test_errors": 10, "stage": "evaluate"})
    from kd_cli.jobs import rows_of
    from kd_cli.report import swept_keys

    swept, fixed = swept_keys(rows_of([tmp_path / "d0", tmp_path / "d1", tmp_path / "e"]))
    assert swept == ["T", "stage"], swept
    assert fixed == {"Same in every distill job": {"epochs": "3"},
                     "Same in every evaluate job": {"checkpoint": "d0/checkpoint.pt"}}, fixed
    text = report([tmp_path / "d0", tmp_path / "d1", tmp_path / "e"])
    assert "| job | T | stage | status |" in text and "Same in every evaluate job: `checkpoint=d0/checkpoint.pt`" in text
    # one stage: one line, as before
    assert swept_keys(rows_of([tmp_path / "d0", tmp_path / "d1"]))[1] == {"Same in every job": {"epochs": "3"}}
    # a value one job typed and another had from its config is the same in both: listed
    finished_job(tmp_path / "d3", ["T=5"], {"T": 5, "epochs": 3, "lr": 0.05}, {"test_errors": 1, "stage": "distill"})
    finished_job(tmp_path / "d4", ["T=5", "lr=0.05"], {"T": 5, "epochs": 3, "lr": 0.05},
                 {"test_errors": 2, "stage": "distill"})
    assert swept_keys(rows_of([tmp_path / "d3", tmp_path / "d4"])) == ([], {"Same in every job": {"T": "5", "lr": "0.05"}})
    # a job that has not finished says no stage: it is compared with every stage's jobs
    finished_job(tmp_path / "d2", ["T=8", "epochs=3"], {"T": 8, "epochs": 3, "lr": 0.05}, {"test_errors": 0})
    (tmp_path / "d2" / "metrics.json").unlink()
    assert swept_keys(rows_of([tmp_path / "d0", tmp_path / "d2"]))[0] == ["T"]


def test_a_stopped_job_takes_its_stage_from_its_hydra_record(tmp_path):
    # no metrics.json yet: the stage is the job name Hydra recorded (each conf sets it to the stage)
    finished_job(tmp_path / "d0", ["T=2"], {"T": 2}, {"test_errors": 10, "stage": "distill"})
    finished_job(tmp_path / "d1", ["T=5"], {"T": 5}, {"test_errors": 0})
    (tmp_path / "d1" / "metrics.json").unlink()
    (tmp_path / "d1" / "state.pt").write_bytes(b"")
    (tmp_path / "d1" / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: distill\n")
    finished_job(tmp_path / "e", ["checkpoint=c.pt"], {"checkpoint": "c.pt"}, {"test_errors": 7, "stage": "evaluate"})
    text = report([tmp_path / "d0", tmp_path / "d1", tmp_path / "e"])
    assert "| d1 | 5 | distill | stopped |" in text, text


def test_a_job_that_never_started_is_of_its_sweeps_stage_in_a_report_of_several(kd):
    kd("train-student", "-m", *SMALL, "seed=0,1", "hydra.sweep.dir=sw")
    (job0, job1) = sorted((kd.cwd / "sw").glob("*_*"))
    kd("evaluate", f"checkpoint={job0}", "hydra.run.dir=e")
    shutil.rmtree(job1)  # now "not started": the sweep's multirun.yaml says its stage
    text = report([kd.cwd / "sw", kd.cwd / "e"])
    assert f"| {job1.name} | 1 | train-student | not started |" in text, text
    assert "Same in every train-student job: " in text and "| epochs |" not in text


def test_a_custom_subdir_never_lets_two_jobs_share_a_folder_and_continues_only_as_it_ran(kd, tmp_path):
    sweep = tmp_path / "s"
    base = ["train-student", "-m", "seed=0,1", *SMALL, f"hydra.sweep.dir={sweep}"]
    shared = kd(*base, "hydra.sweep.subdir=same", check=False)
    assert shared.returncode == 2 and "would both write in" in shared.stderr and not sweep.exists(), shared.stderr
    kd(*base, "hydra.sweep.subdir=s${seed}")
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    # relaunched with another lr, each job's folder (s0, s1) is found by its subdir and refused
    changed = kd(*base, "lr=0.05", "hydra.sweep.subdir=s${seed}", check=False)
    assert changed.returncode == 2 and "sweep job s0 ran with" in changed.stderr, changed.stderr
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before
    again = kd(*base, "hydra.sweep.subdir=s${seed}")  # the same command: both kept
    assert again.stdout.count("finished before; kept as it is") == 2, again.stdout
    # a subdir Hydra's resolver names per job (as Hydra's launcher sets it) is two folders, and a
    # sweep stopped in its first job continues in them: the stopped job resumed, the other started
    other = tmp_path / "r"
    per_job = ["train-student", "-m", "seed=0,1", *SMALL, f"hydra.sweep.dir={other}", "hydra.sweep.subdir=r${hydra:job.num}"]
    stopped = kd(*per_job, extra_env={"KD_TEST_SIGNAL_AT": "SIGINT@2:0"}, check=False)
    assert stopped.returncode == 130 and (other / "r0" / "state.pt").is_file() and not (other / "r1").exists()
    kd(*per_job)
    assert all((other / f"r{n}" / "metrics.json").is_file() for n in (0, 1))
    changed = kd(*per_job, "lr=0.05", check=False)  # and refuses a relaunch that would change them
    assert changed.returncode == 2 and "sweep job r0 ran with" in changed.stderr, changed.stderr
    search = kd("train-student", "-m", "hparams_search=train_student", "data.val_size=100", *SMALL,
                f"hydra.sweep.dir={tmp_path / 'q'}", "hydra.sweep.subdir=t${hydra.job.num}", check=False)
    assert search.returncode == 2 and "a search names its trials' folders" in search.stderr, search.stderr


def test_seeds_are_never_pooled_across_teacher_files_checkpoints_or_code(tmp_path):
    # one teacher path, two files behind it (replaced between sweeps); evaluations of two files at
    # one path; the same command run by two versions of kd's code: each is its own group
    code = {"losses.py": "1" * 16, "train.py": "2" * 16}
    same = {"stage": "distill", "data_sha256": "a" * 64, "precision": "bf16", "threads": 2, "code_sha256": code}
    teacher = lambda sha: {"teacher": {"path": "/t.pt", "sha256": sha * 64}}  # noqa: E731
    jobs = [({**same, **teacher("c")}, 10), ({**same, **teacher("c")}, 20), ({**same, **teacher("d")}, 100),
            ({**same, **teacher("c"), "code_sha256": {**code, "losses.py": "3" * 16}}, 1000),
            ({**same, "teacher": [{"path": "/t.pt", "sha256": "c" * 64}, {"path": "/u.pt", "sha256": "e" * 64}]}, 5000)]
    for num, (metrics, errors) in enumerate(jobs):
        finished_job(tmp_path / "a" / f"{num}_seed={num}", [f"seed={num}"], {"seed": num, "teacher": "/t.pt"},
                     {"test_errors": errors, **metrics})
    ev = {"stage": "evaluate", "data_sha256": "a" * 64, "code_sha256": code}
    for num, sha in enumerate("ffg"):
        finished_job(tmp_path / "b" / f"{num}_seed={num}", [f"seed={num}"], {"seed": num, "checkpoint": "/s.pt"},
                     {"test_errors": 7 + (sha == "g"), **ev, "checkpoint_files": [{"path": "/s.pt", "sha256": sha * 64}]})
    from kd_cli.jobs import rows_of
    from kd_cli.report import swept_keys

    rows = rows_of([tmp_path / "a"])
    swept, _ = swept_keys(rows)
    assert {"teacher_sha256", "code_sha256"} <= set(swept), swept
    assert sorted((g["n"], g["mean"]) for g in seed_groups(rows, swept)) == [(1, 100), (1, 1000), (1, 5000), (2, 15)]
    rows = rows_of([tmp_path / "b"])
    swept, _ = swept_keys(rows)
    assert sorted((g["n"], g["mean"]) for g in seed_groups(rows, swept)) == [(1, 8), (2, 7)], swept


def test_a_setting_whose_seeds_did_not_all_finish_says_so_and_is_never_the_best(tmp_path):
    # lr=0.1: three seeds done; lr=0.2: the best validation errors, but one of its seeds diverged;
    # lr=0.3: every seed failed
    for num, (lr, seed, val) in enumerate([(0.1, 0, 30), (0.1, 1, 30), (0.1, 2, 30), (0.2, 0, 10), (0.2, 1, 10),
                                           (0.2, 2, None), (0.3, 0, None), (0.3, 1, None)]):
        folder = tmp_path / f"{num}_lr={lr},seed={seed}"
        if val is None:
            finished_job(folder, [f"lr={lr}", f"seed={seed}"], {"lr": lr, "seed": seed}, {"test_errors": 0})
            (folder / "metrics.json").unlink()
            (folder / "error.txt").write_text("training diverged at epoch 1\n")
        else:
            finished_job(folder, [f"lr={lr}", f"seed={seed}"], {"lr": lr, "seed": seed},
                         {"test_errors": 100 - val, "val_errors": val, "val_size": 1000})
    text = report([tmp_path])
    assert "| 0.1 | 3 | 70.0 |" in text and "| 0.2 | 2 of 3 | 90.0 |" in text and "| 0.3 | 0 of 2 |  |" in text, text
    assert "Best by validation: 0, 1, 2 (`lr=0.1`)" in text, text
