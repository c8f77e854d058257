"""scripts/paper_table.py, the one command for the paper's table, on the tiny data set: every row
it prints comes from the runs it made."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KD

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper_table.py"


@pytest.mark.subprocess
def test_paper_table_reports_the_runs_it_made(kd, tmp_path, tiny_root):
    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'teacher'}")
    out = tmp_path / "table"
    env = {**os.environ, "KD_DATA_ROOT": str(tiny_root),
           "PATH": f"{Path(KD).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the script runs `kd`
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "1", "--teacher", str(tmp_path / "teacher" / "checkpoint.pt"), "--extra", "epochs=1 model.hidden=[16]",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    folders = {"teacher": ["../teacher"], "student": ["student-seed1"], "distilled": ["distilled-seed1"],
               "distilled_paper_setup": ["distilled-paper-setup-seed1"]}
    for row, names in folders.items():
        errors = [json.loads((out / n / "metrics.json").read_text())["test_errors"] for n in names]
        assert [r["test_errors"] for r in table["runs"][row]] == errors
        assert table["mean"][row] == statistics.mean(errors)
    gap = table["mean"]["student"] - table["mean"]["teacher"]
    if gap > 0:
        closed = (table["mean"]["student"] - table["mean"]["distilled"]) / gap
        assert abs(table["gap_closed"]["distilled"] - closed) < 1e-9
    # the two distilled rows ran what they say: the default recipe, and the paper's setup
    md = (out / "table.md").read_text()
    assert md.strip() in proc.stdout  # printed, and written
    assert "default recipe: T=5 alpha=0.1, jittered +-2 px transfer set" in md
    assert "paper's setup (`recipe=student`): T=20 alpha=0.1, unjittered transfer set" in md
    assert len([line for line in md.splitlines() if line.startswith("| ") and "784" in line]) == 4


def test_same_results_tells_identical_runs_from_different_ones(kd, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("same_results", SCRIPT.with_name("same_results.py"))
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    for name in ("before", "after"):
        kd("train-student", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / name / 'student'}")
    assert same.compare(tmp_path / "before" / "student", tmp_path / "after" / "student") == ""
    kd("train-student", "model.hidden=[16]", "epochs=1", "seed=1", f"hydra.run.dir={tmp_path / 'other' / 'student'}")
    assert same.compare(tmp_path / "before" / "student", tmp_path / "other" / "student") == "weights differ"
