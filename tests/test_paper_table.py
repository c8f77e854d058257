"""scripts/paper_table.py, the one command for the paper's table, on the tiny data set: every row
it prints comes from the runs it made. The script runs `kd` as a command; here each of those
commands runs in-process (the same main() the console script calls), so no process starts."""
import contextlib
import importlib.util
import io
import json
import statistics
import sys
from pathlib import Path

from conftest import run_in_process

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper_table.py"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_table_reports_the_runs_it_made(kd, tmp_path, tiny_root, monkeypatch):
    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'teacher'}")
    script, commands = load_script("paper_table"), []

    def kd_command(cmd, check):
        assert cmd[0] == "kd" and check
        commands.append(cmd)
        proc = run_in_process(cmd[1:], tmp_path, {"KD_DATA_ROOT": str(tiny_root)})
        assert proc.returncode == 0, proc.stderr

    monkeypatch.setattr(script.subprocess, "run", kd_command)
    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["paper_table.py", "--seeds", "1", "--teacher", str(tmp_path / "teacher" / "checkpoint.pt"),
                                      "--extra", "epochs=1 model.hidden=[16]", "--out", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        script.main()
    assert [c[1:3] for c in commands] == [["train-student", "-m"], ["distill", "-m"], ["distill", "-m"]]
    table = json.loads((out / "table.json").read_text())
    folders = {"teacher": [tmp_path / "teacher"], **{row: sorted((out / sub).glob("0_*")) for row, sub in (
        ("student", "student"), ("distilled", "distilled"), ("distilled_paper_setup", "distilled-paper-setup"))}}
    assert all(len(runs) == 1 for runs in folders.values())  # one seed: one job per sweep
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


def test_same_results_tells_identical_runs_from_different_ones(kd, tmp_path):
    same = load_script("same_results")
    for name in ("before", "after"):
        kd("train-student", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / name / 'student'}")
    assert same.compare(tmp_path / "before" / "student", tmp_path / "after" / "student") == ""
    kd("train-student", "model.hidden=[16]", "epochs=1", "seed=1", f"hydra.run.dir={tmp_path / 'other' / 'student'}")
    assert same.compare(tmp_path / "before" / "student", tmp_path / "other" / "student") == "weights differ"
