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

N = 5  # test images: one lit pixel at the centre (13, 13), all labelled 0


class LitWithin(nn.Module):
    """Class 0 when the lit pixel lies within `reach` px (Chebyshev) of the centre, else class 1."""

    def __init__(self, reach):
        super().__init__()
        self.reach = reach

    def forward(self, x):
        r = self.reach
        near = x.view(-1, 28, 28)[:, 13 - r:14 + r, 13 - r:14 + r].sum((1, 2))
        return torch.stack([10 * near, torch.full_like(near, 5.0)], dim=1)


def test_errors_by_ring_count_each_shift_once_in_its_ring():
    script = load_script("shift_robustness")
    x, y = torch.zeros(N, 28, 28), torch.zeros(N, dtype=torch.long)
    x[:, 13, 13] = 1
    # reach 0: right only unshifted; reach 1: right for every 1-px shift, wrong for every 2-px one
    assert script.errors_by_ring(LitWithin(0), x, y, 2) == {0: [0], 1: [N] * 8, 2: [N] * 16}
    assert script.errors_by_ring(LitWithin(1), x, y, 2) == {0: [0], 1: [0] * 8, 2: [N] * 16}
    assert script.errors_by_ring(LitWithin(1), x, y, 3) == {0: [0], 1: [0] * 8, 2: [N] * 16, 3: [N] * 24}


def test_the_script_tables_a_trained_checkpoint_and_refuses_a_missing_one(kd, monkeypatch, capsys):
    """Run as a user would: one row per checkpoint with its unshifted errors (those kd evaluate
    counts) and a mean and range per ring; a missing checkpoint is one error line, exit 2, and no
    table (every checkpoint is loaded before any is measured)."""
    script = load_script("shift_robustness")
    kd("train-student", "epochs=2", *TINY, "hydra.run.dir=student")
    ckpt = kd.cwd / "student" / "checkpoint.pt"
    unshifted = json.loads((kd.cwd / "student" / "metrics.json").read_text())["test_errors"]
    monkeypatch.setenv("KD_DATA_ROOT", str(kd.root))
    monkeypatch.setattr(sys, "argv", ["shift_robustness.py", str(ckpt), "--json", str(kd.cwd / "s.json")])
    script.main()
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {ckpt} |")]
    assert len(row) == 1 and row[0].split(" | ")[1:3] == ["train-student", str(unshifted)]
    rings = json.loads((kd.cwd / "s.json").read_text())[str(ckpt)]["errors_by_ring"]
    assert [len(rings[d]) for d in ("0", "1", "2")] == [1, 8, 16] and rings["0"] == [unshifted]
    cells = [f"{statistics.mean(rings[d]):.1f} ({min(rings[d])}-{max(rings[d])})" for d in ("1", "2")]
    assert row[0].split(" | ")[3:] == [cells[0], cells[1] + " |"] and cells[0] != cells[1]

    monkeypatch.setattr(sys, "argv", ["shift_robustness.py", str(ckpt), str(kd.cwd / "nothing.pt")])
    with pytest.raises(SystemExit) as exit_:
        script.main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "| checkpoint |" not in out
    assert err.startswith("shift_robustness: error: checkpoint not found") and len(err.splitlines()) == 1
