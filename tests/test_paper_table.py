"""scripts/paper_table.py, the one command for the paper's table, on the tiny data set: every row
it prints comes from the runs it made. The script runs `kd` as a command; here each of those
commands runs in-process (the same main() the console script calls), so no process starts."""
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import load_script, run_in_process


def patch_run(monkeypatch, script, run):
    """The script's subprocess.run replaced by `run`, for the script alone: kd itself (which asks
    git for its revision) keeps the real one."""
    monkeypatch.setattr(script, "subprocess", SimpleNamespace(run=run, STDOUT=subprocess.STDOUT,
                                                              CalledProcessError=subprocess.CalledProcessError))


def kd_in_process(script, monkeypatch, cwd, tiny_root, env=None):
    """Make the script's `kd ...` commands run in-process (subprocess.run patched); returns the list
    of commands run. `env` is read at each command, so a test can change it between calls. A failed
    command prints its stderr and, with check=True, raises CalledProcessError, as subprocess.run does."""
    commands = []

    def kd_command(cmd, check):
        assert Path(cmd[0]).name == "kd"
        cmd = ["kd", *cmd[1:]]
        commands.append(cmd)
        proc = run_in_process(cmd[1:], cwd, {"KD_DATA_ROOT": str(tiny_root), **(env or {})})
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            if check:
                raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc
    patch_run(monkeypatch, script, kd_command)
    return commands


def test_paper_table_reports_the_runs_it_made(kd, tmp_path, tiny_root, monkeypatch):
    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'teacher'}")
    script = load_script("paper_table")
    commands = kd_in_process(script, monkeypatch, tmp_path, tiny_root)
    out = tmp_path / "table"
    # seed 1 given twice: one run of it, counted once in each mean
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "1", "1", "--teacher", str(tmp_path / "teacher" / "checkpoint.pt"),
                                      "--extra", "epochs=1 model.hidden=[16]", "--out", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        script.main()
    # longest first: the default recipe's distillation, the paper's setup, the hard-label student
    assert [c[1:3] for c in commands] == [["distill", "-m"], ["distill", "-m"], ["train-student", "-m"]]
    table = json.loads((out / "table.json").read_text())
    folders = {"teacher": [tmp_path / "teacher"], **{row: sorted((out / sub).glob("seed1/0_*")) for row, sub in (
        ("student", "student"), ("distilled", "distilled"), ("distilled_paper_setup", "distilled-paper-setup"))}}
    assert all(len(runs) == 1 for runs in folders.values())  # one seed: one run per row
    for row, runs in folders.items():
        errors = [json.loads((run / "metrics.json").read_text())["test_errors"] for run in runs]
        assert [r["test_errors"] for r in table["runs"][row]] == errors
        assert table["mean"][row] == statistics.mean(errors)
    gap = table["mean"]["student"] - table["mean"]["teacher"]
    if gap > 0:
        closed = (table["mean"]["student"] - table["mean"]["distilled"]) / gap
        assert abs(table["gap_closed"]["distilled"] - closed) < 1e-9
    # the two distilled rows ran what they say: the default recipe, and the paper's setup
    md = (out / "table.md").read_text()
    assert md.strip() in printed.getvalue()  # printed, and written
    assert "default recipe: T=5 alpha=0.1, jittered +-2 px transfer set" in md
    assert "paper's setup (`recipe=paper`): T=20 alpha=0.1, unjittered transfer set" in md
    assert len([line for line in md.splitlines() if line.startswith("| ") and "784" in line]) == 4
    # the same command again continues the table: every run finished, so none trains again
    saved = {run: (run / "metrics.json").read_bytes() for runs in folders.values() for run in runs}
    commands.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        script.main()
    assert len(commands) == 3 and {run: (run / "metrics.json").read_bytes() for run in saved} == saved
    assert json.loads((out / "table.json").read_text())["runs"] == table["runs"]


def test_paper_table_jobs_run_side_by_side_with_a_share_of_the_cores_and_report_failures(tmp_path, monkeypatch):
    """--jobs 4 with three runs on 12 cores: all three in flight at once (each waits for the others
    at a barrier, which runs one after another would never pass), each with 12 // 3 = 4 threads and
    its output appended to its own log; a failed run does not stop the others and comes back with
    its log."""
    script = load_script("paper_table")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    all_three = threading.Barrier(3, timeout=30)
    seen = []

    def fake_run(cmd, check, env, stdout, stderr):
        all_three.wait()  # BrokenBarrierError unless the other two runs are in flight too
        seen.append((cmd[1], env["OMP_NUM_THREADS"], stdout.name))
        return subprocess.CompletedProcess(cmd, 2 if cmd[1] == "bad" else 0)
    patch_run(monkeypatch, script, fake_run)
    logs = tmp_path / "logs"
    runs = [(["kd", name], logs / f"{name}.log") for name in ("good", "bad", "fine")]
    with contextlib.redirect_stdout(io.StringIO()):
        failed = script.run_all(runs, jobs=4)
    assert failed == [(["kd", "bad"], logs / "bad.log", 2)]
    assert sorted(seen) == [(name, "4", str(logs / f"{name}.log")) for name in ("bad", "fine", "good")]
    assert (logs / "bad.log").read_text().endswith(": kd bad\n")  # the header of this attempt


def test_paper_table_shares_the_cores_among_the_runs_in_flight_not_all_runs(tmp_path, monkeypatch):
    """--jobs 2 with three runs on 12 cores: two in flight at a time, so 6 threads each (not 4)."""
    script = load_script("paper_table")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    seen = []

    def fake_run(cmd, check, env, stdout, stderr):
        seen.append(env["OMP_NUM_THREADS"])
        return subprocess.CompletedProcess(cmd, 0)
    patch_run(monkeypatch, script, fake_run)
    with contextlib.redirect_stdout(io.StringIO()):
        assert script.run_all([(["kd", n], tmp_path / f"{n}.log") for n in "abc"], jobs=2) == []
    assert seen == ["6"] * 3


@pytest.mark.parametrize("jobs,want", [
    (1, "d0 d1 d2 p0 p1 p2 s0 s1 s2"),  # one at a time: longest first
    (2, "d0 s0 d1 d2 p0 p1 p2 s1 s2"),  # beside the first distillation's teacher passes: a student
    (3, "d0 s0 s1 d1 d2 p0 p1 p2 s2"),
    (5, "d0 s0 s1 s2 d1 d2 p0 p1 p2")])
def test_paper_table_runs_students_beside_the_first_distillation_while_it_keeps_the_teachers_logits(jobs, want):
    """The other default-recipe seeds wait on the first one's teacher logits (teacher_cache): the
    runs beside it meanwhile are those that need no teacher."""
    script = load_script("paper_table")
    runs = {row: [f"{row[0]}{seed}" for seed in range(3)] for row in ("distilled", "distilled_paper_setup", "student")}
    runs["distilled_paper_setup"] = [f"p{seed}" for seed in range(3)]
    assert " ".join(script.in_order(runs, jobs)) == want


def test_paper_table_stops_on_a_failed_run_naming_its_log(tmp_path, monkeypatch):
    script = load_script("paper_table")
    monkeypatch.setattr(script, "resolve_pretrained", lambda p: p)
    monkeypatch.setattr(script, "teacher_override", lambda p: str(p))
    monkeypatch.setattr(script, "run_all", lambda runs, jobs: [(runs[1][0], runs[1][1], 2)])
    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "0", "1", "--teacher", "t.pt", "--out", str(out)])
    log = re.escape(f"(exit 2; log {out / 'distilled' / 'seed1.log'})")
    with pytest.raises(SystemExit, match=f"(?s)runs that did not finish.*kd distill -m seed=1 .*{log}"):
        script.main()
    assert not (out / "table.md").exists()


def test_paper_table_continues_its_own_stopped_teacher_and_keeps_it_once_finished(kd, tmp_path, tiny_root, monkeypatch):
    """Without --teacher the table trains its own: rerun after a stop, it resumes that teacher (kd
    would refuse a new run in its folder); rerun once it has finished, it trains no teacher again."""
    out, tiny = tmp_path / "table", ["epochs=2", "model.hidden=[16]"]
    script = load_script("paper_table")
    kd("train-teacher", "seed=0", f"eval_every={script.EVAL_EVERY}", *tiny, f"hydra.run.dir={out / 'teacher'}",
       check=False, extra_env={"KD_TEST_SIGNAL_AT": "SIGTERM@2:0"})  # the table's teacher, stopped in its epoch 2
    assert (out / "teacher" / "state.pt").exists() and not (out / "teacher" / "metrics.json").exists()
    commands = kd_in_process(script, monkeypatch, tmp_path, tiny_root)
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "1", "--extra", " ".join(tiny), "--out", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        script.main()
    assert commands[0] == ["kd", "train-teacher", f"resume={out / 'teacher'}"]
    finished = (out / "teacher" / "metrics.json").read_bytes()
    commands.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        script.main()
    assert [c[1] for c in commands] == ["distill", "distill", "train-student"]
    assert (out / "teacher" / "metrics.json").read_bytes() == finished
    commands.clear()  # a teacher begun otherwise is neither kept nor continued into this table
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "1", "--extra", " ".join(tiny),
                                      "--teacher-seed", "1", "--out", str(out)])
    with pytest.raises(SystemExit, match="holds a teacher begun with .*seed=0.* this call asks for .*seed=1"):
        script.main()
    assert commands == [] and (out / "teacher" / "metrics.json").read_bytes() == finished


def test_paper_table_means_and_gap_closed_by_hand(tmp_path, monkeypatch):
    """The table's arithmetic on canned rows (no run): each row's mean over its seeds, and the share
    of the student-teacher gap each distilled row closes, (student - distilled) / (student - teacher),
    in table.json and in the sentence under the table."""
    script = load_script("paper_table")

    def row(seed, errors, **values):
        values = {"seed": str(seed), "T": "5.0", "alpha": "0.1", "data.jitter": "0", "epochs": "1", **values}
        return {"job": f"job{seed}", "status": "done", "values": values, "test_errors": errors,
                "test_total": 100, "train_seconds": 1.0, "wall_seconds": 2.0}
    canned = {"student": [row(0, 10), row(1, 13)], "distilled": [row(0, 4), row(1, 5)],
              "distilled-paper-setup": [row(0, 9), row(1, 7)]}
    monkeypatch.setattr(script, "resolve_pretrained", lambda p: p)
    monkeypatch.setattr(script, "teacher_override", lambda p: str(p))
    monkeypatch.setattr(script, "teacher_row", lambda ckpt: row(0, 3))
    monkeypatch.setattr(script, "run_all", lambda runs, jobs: [])
    # rows_of([<row>/seed<s>]): that seed's canned row
    monkeypatch.setattr(script, "rows_of", lambda paths: [r for r in canned[Path(paths[0]).parent.name]
                                                         if Path(paths[0]).name == f"seed{r['values']['seed']}"])
    out = tmp_path / "table"
    out.mkdir()
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "0", "1", "--teacher", "t.pt", "--out", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        script.main()
    table = json.loads((out / "table.json").read_text())
    assert table["mean"] == {"teacher": 3, "student": 11.5, "distilled": 4.5, "distilled_paper_setup": 8}
    # gap 11.5 - 3 = 8.5: the default recipe closes 7 / 8.5, the paper's setup 3.5 / 8.5
    assert table["gap_closed"] == pytest.approx({"distilled": 7 / 8.5, "distilled_paper_setup": 3.5 / 8.5})
    md = (out / "table.md").read_text()
    assert "closes 82% of the student-teacher gap with the default recipe, 41% in the paper's setup" in md
    assert "| 11.5 | 10 (seed 0), 13 (seed 1) |" in md
    # a teacher no better than the student (a smoke run): no gap, no NaN in table.json or the text
    monkeypatch.setattr(script, "teacher_row", lambda ckpt: row(0, 20))
    with contextlib.redirect_stdout(io.StringIO()):
        script.main()
    table = json.loads((out / "table.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in table.json"))
    assert table["gap_closed"] == {"distilled": None, "distilled_paper_setup": None}
    assert "no gap to close" in (out / "table.md").read_text() and "nan" not in (out / "table.md").read_text()


def test_same_results_tells_identical_runs_from_different_ones(kd, tmp_path, monkeypatch):
    same = load_script("same_results")
    for name in ("before", "after"):
        kd("train-student", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / name / 'student'}")
    assert same.compare(tmp_path / "before" / "student", tmp_path / "after" / "student") == ""
    kd("train-student", "model.hidden=[16]", "epochs=1", "seed=1", f"hydra.run.dir={tmp_path / 'other' / 'student'}")
    assert same.compare(tmp_path / "before" / "student", tmp_path / "other" / "student") == "weights differ"
    for name, ckpt in (("before", "before"), ("after", "after"), ("other", "other")):  # kd evaluate runs
        kd("evaluate", f"checkpoint={tmp_path / ckpt / 'student' / 'checkpoint.pt'}",
           f"hydra.run.dir={tmp_path / name / 'evaluated'}")
    assert same.compare(tmp_path / "before" / "evaluated", tmp_path / "after" / "evaluated") == ""
    assert "differ" in same.compare(tmp_path / "before" / "evaluated", tmp_path / "other" / "evaluated")
    # the same counts, but one error called another class: only the confusion matrix says so
    moved = tmp_path / "moved" / "evaluated"
    shutil.copytree(tmp_path / "before" / "evaluated", moved)
    m = json.loads((moved / "metrics.json").read_text())
    true, row = next((i, r) for i, r in enumerate(m["confusion"]) if sum(r) > r[i])  # a class with an error
    wrong = next(j for j, v in enumerate(row) if v and j != true)
    row[wrong] -= 1
    row[next(j for j in range(10) if j not in (true, wrong))] += 1
    (moved / "metrics.json").write_text(json.dumps(m))
    assert same.compare(tmp_path / "before" / "evaluated", moved) == "confusion differ"
    # a run missing from one side, or not finished in it, is not "the same"
    (tmp_path / "after" / "evaluated" / "metrics.json").unlink()
    shutil.copytree(tmp_path / "before" / "student", tmp_path / "before" / "extra")
    monkeypatch.setattr(sys, "argv", ["same_results.py", str(tmp_path / "before"), str(tmp_path / "after")])
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as printed:
        same.main()
    assert e.value.code == 1 and "1 of 3 runs the same" in printed.getvalue(), printed.getvalue()
    assert "DIFFERENT extra: only in" in printed.getvalue() and "evaluated: not finished" in printed.getvalue()


def test_shipped_teacher_serves_teacher_pretrained_and_the_students_only_table(kd, tmp_path, tiny_root, monkeypatch):
    import kd_cli.checkpoint

    ship = load_script("ship_teacher")
    tiny = ["model.hidden=[16]", "epochs=1"]
    kd("train-teacher", *tiny, "seed=3", f"hydra.run.dir={tmp_path / 'teacher'}")
    kd("train-teacher", *tiny, "data.train_limit=300", f"hydra.run.dir={tmp_path / 'part'}")
    kd("train-teacher", *tiny, "data.transfer.exclude=[3]", f"hydra.run.dir={tmp_path / 'no3'}")
    kd("train-student", *tiny, f"hydra.run.dir={tmp_path / 'student'}")
    shutil.copytree(tmp_path / "teacher", tmp_path / "mixed")  # another run's metrics beside the checkpoint
    shutil.copy(tmp_path / "part" / "metrics.json", tmp_path / "mixed" / "metrics.json")
    shipped = tmp_path / "shipped"
    for run, why, paper_arch in (("part", "not trained on all", False), ("no3", "not trained on all", False),
                                 ("student", "not train-teacher", False), ("nowhere", "not a finished run", False),
                                 ("mixed", "not the same run", False), ("teacher", "not the paper's", True)):
        with pytest.raises(SystemExit, match=why):
            ship.ship(tmp_path / run, shipped, "abc123", "test box", paper_arch=paper_arch)
    assert not shipped.exists()

    record = ship.ship(tmp_path / "teacher", shipped, "abc123", "test box", paper_arch=False)
    trained = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert (shipped / "teacher.pt").read_bytes() == (tmp_path / "teacher" / "checkpoint.pt").read_bytes()
    # shell-quoted, pasteable, with the precision auto settled on (another machine may settle otherwise)
    assert record["command"] == f"kd train-teacher 'model.hidden=[16]' epochs=1 seed=3 precision={trained['precision']}"
    assert f"**{trained['test_errors']} test errors** of {trained['test_total']}" in (shipped / "README.md").read_text()
    assert json.loads((shipped / "teacher.json").read_text())["test_errors"] == trained["test_errors"]
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    with pytest.raises(SystemExit, match="not better"):  # the same teacher again is not better: nothing replaced
        ship.ship(tmp_path / "teacher", shipped, "def456", "test box", paper_arch=False)
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    worse = json.loads((shipped / "teacher.json").read_text())  # a shipped teacher one error worse is replaced
    (shipped / "teacher.json").write_text(json.dumps({**worse, "test_errors": trained["test_errors"] + 1}))
    ship.ship(tmp_path / "teacher", shipped, "def456", "test box", paper_arch=False)
    assert json.loads((shipped / "teacher.json").read_text())["commit"] == "def456"
    shutil.copy(tmp_path / "part" / "checkpoint.pt", shipped / "teacher.pt")  # a teacher.pt its record does not
    with pytest.raises(SystemExit, match="no matching teacher.json"):       # describe: refused, never overwritten blind
        ship.ship(tmp_path / "teacher", shipped, "ghi789", "test box", paper_arch=False)
    (shipped / "teacher.json").unlink()
    with pytest.raises(SystemExit, match="no matching teacher.json"):
        ship.ship(tmp_path / "teacher", shipped, "ghi789", "test box", paper_arch=False)

    ship.ship(tmp_path / "teacher", tmp_path / "shipped2", "abc123", "test box", paper_arch=False)
    shipped = tmp_path / "shipped2"
    # what ship wrote is what kd accepts as teacher=pretrained; the table then trains students only
    monkeypatch.setattr(kd_cli.checkpoint, "pretrained_folder", lambda: shipped)
    script = load_script("paper_table")
    commands = kd_in_process(script, monkeypatch, tmp_path, tiny_root)
    out = tmp_path / "table"
    # seed 1 given twice: one run of it, counted once in each mean
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "1", "1", "--teacher", "pretrained",
                                      "--extra", "epochs=1 model.hidden=[16]", "--out", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        script.main()
    assert [c[1] for c in commands] == ["distill", "distill", "train-student"]
    assert all("teacher=pretrained" in c for c in commands[:2])
    table = json.loads((out / "table.json").read_text())
    assert table["runs"]["teacher"] == [{"job": str(shipped / "teacher.pt"), "test_errors": trained["test_errors"], "seed": 3,
                                         "train_seconds": trained["train_seconds"], "wall_seconds": trained["wall_seconds"]}]
    for sub in ("distilled", "distilled-paper-setup"):
        student = json.loads(next((out / sub).glob("seed1/0_*/metrics.json")).read_text())
        assert student["teacher"]["sha256"] == record["sha256"]


def test_transfer_script_names_the_shipped_teacher_and_resolves_paths(monkeypatch, tmp_path):
    """`--teacher pretrained` reaches kd as kd's own name (not as ./pretrained, a folder of the
    checkout); any other teacher as an absolute path, so the runs find it from their own folders."""
    script, seen = load_script("transfer_experiments"), []

    class Stop(Exception):
        pass

    def first_run(stage, run_dir, *overrides):
        seen.append(overrides)
        raise Stop  # the first command is all this test needs
    monkeypatch.setattr(script, "kd", first_run)
    monkeypatch.chdir(tmp_path)
    for given, expected in (("pretrained", "teacher=pretrained"), ("t/checkpoint.pt", f"teacher={tmp_path / 't' / 'checkpoint.pt'}")):
        monkeypatch.setattr(sys, "argv", ["transfer_experiments.py", "only78", "--teacher", given,
                                          "--out", str(tmp_path / f"o{len(seen)}")])  # one call's runs a folder
        with pytest.raises(Stop):
            script.main()
        assert expected in seen[-1]


def test_transfer_script_resume_continues_a_stopped_sweep_to_the_uninterrupted_table(kd, tmp_path, tiny_root, monkeypatch):
    """A width_vs_T call stopped in its first job continues with --resume: the stopped job resumes
    (kd's resume= of the sweep), the jobs not begun start, and the table is the one an uninterrupted
    call writes. Without --out, --resume has nothing to continue and is refused."""
    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'teacher'}")
    script, stop_env = load_script("transfer_experiments"), {}
    monkeypatch.setattr(script, "WIDTH_TS", [2, 5])
    monkeypatch.setattr(script, "WIDTHS", [16, 8])
    commands = kd_in_process(script, monkeypatch, tmp_path, tiny_root, stop_env)

    def call(out, *flags):
        monkeypatch.setattr(sys, "argv", ["transfer_experiments.py", "width_vs_T", "--teacher",
                                          str(tmp_path / "teacher" / "checkpoint.pt"),
                                          "--extra", "epochs=2", "--out", str(out), *flags])
        with contextlib.redirect_stdout(io.StringIO()):
            script.main()

    def table(out):  # the last line is the call's wall time
        return (out / "width_vs_T" / "table.md").read_text().splitlines()[:-1]

    call(tmp_path / "whole")
    stopped, sweep = tmp_path / "stopped", tmp_path / "stopped" / "width_vs_T" / "sweep"
    stop_env["KD_TEST_SIGNAL_AT"] = "SIGTERM@2:0"  # job 0, epoch 2: the sweep ends there
    with pytest.raises(subprocess.CalledProcessError):
        call(stopped)
    assert len(list(sweep.glob("*/state.pt"))) == 1 and not list(sweep.glob("*/metrics.json"))
    del stop_env["KD_TEST_SIGNAL_AT"]
    commands.clear()
    call(stopped, "--resume")
    assert commands[0] == ["kd", "distill", f"resume={sweep}"]
    assert commands[1][1:3] == ["train-student", "-m"]  # not begun before: starts
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    assert table(stopped) == table(tmp_path / "whole") and "| 16 |" in "\n".join(table(stopped))
    monkeypatch.setattr(sys, "argv", ["transfer_experiments.py", "width_vs_T", "--resume"])
    with pytest.raises(SystemExit, match="--resume needs the --out"):
        script.main()
    # another --extra, or no --teacher (kd's newest, pinned), than the call that began it: refused
    for flags in (["--teacher", str(tmp_path / "teacher" / "checkpoint.pt"), "--extra", "epochs=3"], []):
        monkeypatch.setattr(sys, "argv", ["transfer_experiments.py", "width_vs_T", *flags, "--out", str(stopped), "--resume"])
        commands.clear()
        with pytest.raises(SystemExit, match="was begun with .* and this call gives"):
            script.main()
        assert commands == []
    # nor without --resume: a refused call leaves the record of the call that began the runs
    record = (stopped / "width_vs_T" / "call.json").read_bytes()
    monkeypatch.setattr(sys, "argv", ["transfer_experiments.py", "width_vs_T", "--teacher",
                                      str(tmp_path / "teacher" / "checkpoint.pt"), "--extra", "epochs=3", "--out", str(stopped)])
    with pytest.raises(SystemExit, match="was begun with"):
        script.main()
    assert (stopped / "width_vs_T" / "call.json").read_bytes() == record and commands == []


def test_scripts_run_the_kd_installed_beside_their_python_not_only_one_on_path(tmp_path, monkeypatch):
    """`.venv/bin/python scripts/paper_table.py` with the environment not activated: kd is not on
    PATH, but beside the Python that runs the script; the command keeps its printed form `kd ...`."""
    from kd_cli.cli import installed
    venv_bin, on_path = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    for folder in (venv_bin, on_path):
        folder.mkdir(parents=True)
        (folder / "kd").write_text("#!/bin/sh\n")
        (folder / "kd").chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path))
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert installed(["kd", "distill", "T=5"]) == [str(venv_bin / "kd"), "distill", "T=5"]
    (venv_bin / "kd").unlink()  # a Python without kd beside it (a system one): the kd on PATH
    assert installed(["kd", "report", "x"]) == [str(on_path / "kd"), "report", "x"]
    assert installed(["python", "-c", "1"]) == ["python", "-c", "1"]


@pytest.mark.parametrize("flag", ["--extra", "--distill-extra", "--teacher-extra"])
def test_paper_table_refuses_a_sweep_in_its_overrides(flag, tmp_path, monkeypatch):
    # a row is one setting's mean over seeds: T=3,8 would have averaged two temperatures into one row
    script = load_script("paper_table")
    patch_run(monkeypatch, script, lambda *a, **k: pytest.fail("ran a kd command"))
    monkeypatch.setattr(sys, "argv", ["paper_table.py", flag, "epochs=1 T=3,8", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert f"{flag} T=3,8 is a sweep" in str(e.value) and not (tmp_path / "t").exists()


def test_the_teacher_row_is_the_checkpoints_own_metrics_not_its_folders(tmp_path):
    # a folder's metrics.json may be another file's (a checkpoint copied in, a run finished again)
    from kd_cli.checkpoint import save_checkpoint

    script = load_script("paper_table")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"test_errors": 999, "test_error_rate": 0.0999}))
    metrics = {"seed": 4, "test_errors": 65, "test_total": 10000, "train_seconds": 1.0, "wall_seconds": 2.0}
    save_checkpoint(tmp_path / "checkpoint.pt", {"stage": "train-teacher", "arch": {"hidden": [4]}, "state_dict": {},
                                                 "metrics": metrics})
    row = script.teacher_row(tmp_path / "checkpoint.pt")
    assert row["test_errors"] == 65 and row["values"]["seed"] == "4"


def test_paper_table_counts_errors_every_10th_epoch_unless_an_extra_says_otherwise(tmp_path, monkeypatch):
    script = load_script("paper_table")
    monkeypatch.setattr(script, "resolve_pretrained", lambda p: p)
    monkeypatch.setattr(script, "teacher_override", lambda p: str(p))
    ran = []

    def run_all(runs, jobs):
        ran.extend(cmd for cmd, _ in runs)
        raise KeyboardInterrupt  # enough: the commands are what this test reads
    monkeypatch.setattr(script, "run_all", run_all)
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "0", "--teacher", "t.pt", "--distill-extra",
                                      "eval_every=1", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit):
        script.main()
    # Hydra takes a key's last value: the default recipe's row counts every epoch, the others every 10th
    last = {cmd[1] + ("-paper" if "recipe=paper" in cmd else ""): [o for o in cmd if o.startswith("eval_every=")][-1]
            for cmd in ran}
    assert last == {"distill": "eval_every=1", "distill-paper": "eval_every=10", "train-student": "eval_every=10"}
