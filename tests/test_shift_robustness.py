"""scripts/shift_robustness.py: each test image moved by every shift up to max_shift px, the errors
grouped by ring (max(|dy|, |dx|)). Checked with hand-made models whose answers depend on where one
lit pixel lands, so the expected counts follow from the geometry alone."""
import json
import statistics
import sys

import pytest
import torch
from conftest import TINY, load_script
from torch import nn

from kd_cli.checkpoint import load_checkpoint, save_checkpoint

N = 5  # test images: one lit pixel at the centre (13, 13), all labelled 0


class LitAt(nn.Module):
    """Class 0 when the lit pixel lies within `reach` px (Chebyshev) of (row, col), else class 1."""

    def __init__(self, reach, row=13, col=13):
        super().__init__()
        self.reach, self.row, self.col = reach, row, col

    def forward(self, x):
        r, i, j = self.reach, self.row, self.col
        near = x.view(-1, 28, 28)[:, i - r:i + r + 1, j - r:j + r + 1].sum((1, 2))
        return torch.stack([10 * near, torch.full_like(near, 5.0)], dim=1)


@pytest.fixture
def lit():
    x, y = torch.zeros(N, 28, 28), torch.zeros(N, dtype=torch.long)
    x[:, 13, 13] = 1
    return x, y


def test_each_shift_moves_the_digit_by_its_own_dy_dx(lit):
    """Right only where the pixel lands: (14, 12) is 1 px down and 1 px left, and only that shift."""
    script = load_script("shift_robustness")
    errors = script.errors_by_shift(LitAt(0, row=14, col=12), *lit, 2)
    assert len(errors) == 25 and {s for s, e in errors.items() if e == 0} == {(1, -1)}
    assert set(errors.values()) == {0, N}


def test_errors_by_ring_count_each_shift_once_in_its_ring(lit):
    script = load_script("shift_robustness")
    rings = lambda model, m: script.rings_of(script.errors_by_shift(model, *lit, m))  # noqa: E731
    # reach 0: right only unshifted; reach 1: right for every 1-px shift, wrong for every 2-px one
    assert rings(LitAt(0), 2) == {0: [0], 1: [N] * 8, 2: [N] * 16}
    assert rings(LitAt(1), 2) == {0: [0], 1: [0] * 8, 2: [N] * 16}
    assert rings(LitAt(1), 3) == {0: [0], 1: [0] * 8, 2: [N] * 16, 3: [N] * 24}


def test_describe_names_the_stage_its_jitter_and_a_students_T_or_loss():
    describe = load_script("shift_robustness").describe
    assert describe({"stage": "distill", "config": {"T": 20.0, "loss": "kd", "data": {"jitter": 0}}}) == \
        "distill T=20 jitter=0"
    assert describe({"stage": "distill", "config": {"T": 2.5, "data": {"jitter": 2}}}) == "distill T=2.5 jitter=2"
    assert describe({"stage": "distill", "config": {"T": 5, "loss": "logit_mse", "data": {"jitter": 2}}}) == \
        "distill loss=logit_mse jitter=2"
    assert describe({"stage": "train-teacher", "config": {"data": {"jitter": 2}}}) == "train-teacher jitter=2"


@pytest.fixture
def student(kd, monkeypatch):
    """A 1-epoch tiny student (some errors left, so its rings differ) and the data root in the env."""
    kd("train-student", "epochs=1", *TINY, "hydra.run.dir=student")
    monkeypatch.setenv("KD_DATA_ROOT", str(kd.root))
    return kd.cwd / "student"


def run_script(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["shift_robustness.py", *map(str, argv)])
    load_script("shift_robustness").main()


def test_the_script_tables_each_ring_of_a_trained_checkpoint(student, monkeypatch, capsys):
    """Run as a user would: one row per checkpoint with its unshifted errors (those kd counted when
    it trained) and each ring's mean and range, a footnote with the test set's size and the shifts
    per ring, and every shift's errors in the JSON."""
    ckpt, out_json = student / "checkpoint.pt", student.parent / "s.json"
    unshifted = json.loads((student / "metrics.json").read_text())["test_errors"]
    assert unshifted > 0  # else the unshifted column and a ring could both be 0 by chance
    run_script(monkeypatch, ckpt, "--max-shift", "3", "--json", out_json)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| checkpoint | what | unshifted | 1 px: mean (min-max) | 2 px: mean (min-max) | "
                         "3 px: mean (min-max) |", "|" + " --- |" * 6]
    shifts = json.loads(out_json.read_text())[str(ckpt)]["errors_by_shift"]
    assert len(shifts) == 49 and shifts["0,0"] == unshifted
    ring = {d: [e for s, e in shifts.items() if max(map(abs, map(int, s.split(",")))) == d] for d in (1, 2, 3)}
    cells = [f"{statistics.mean(ring[d]):.1f} ({min(ring[d])}-{max(ring[d])})" for d in (1, 2, 3)]
    assert len(set(cells)) == 3  # distinct, so a column put in the wrong place shows
    assert lines[2] == f"| {ckpt} | train-student jitter=0 | {unshifted} | " + " | ".join(cells) + " |"
    assert lines[-1].startswith("Test errors out of 200;") and "(8 at 1 px, 16 at 2 px, 24 at 3 px)" in lines[-1]


def test_the_script_refuses_before_it_prints_or_writes_anything(student, monkeypatch, capsys):
    """A bad --max-shift, a missing checkpoint, a --json whose folder is missing, and a checkpoint
    whose outputs are not finite: each one error line, exit 2, no table, the JSON file as it was."""
    ckpt, kept = student / "checkpoint.pt", student.parent / "kept.json"
    kept.write_text("as it was")
    blown = load_checkpoint(ckpt)
    blown["state_dict"] = {k: v * 1e30 for k, v in blown["state_dict"].items()}
    save_checkpoint(student.parent / "blown.pt", blown)
    for argv, says in (([ckpt, "--max-shift", "0", "--json", kept], "--max-shift is 0"),
                       ([ckpt, student / "nothing.pt", "--json", kept], "checkpoint not found"),
                       ([ckpt, "--json", student / "no" / "s.json"], "its folder does not exist"),
                       ([ckpt, student.parent / "blown.pt", "--json", kept], "NaN or infinite")):
        with pytest.raises(SystemExit) as exit_:
            run_script(monkeypatch, *argv)
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("shift_robustness: error: ") and says in err
        assert kept.read_text() == "as it was"
