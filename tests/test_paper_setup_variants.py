"""scripts/paper_setup_variants.py: a run records what it ran and its errors, and a diverged run
records no errors (none are counted from NaN weights)."""
import json
import sys

from conftest import load_script


def run_script(monkeypatch, tiny_root, teacher, out, *flags):
    script = load_script("paper_setup_variants")
    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    monkeypatch.setattr(sys, "argv", ["paper_setup_variants.py", "--teacher", str(teacher), "--hidden", "16",
                                      "--val-size", "100", "--epochs", "3", "--warmup", "1", "--json", str(out), *flags])
    script.main()
    return json.loads(out.read_text().splitlines()[-1])


def test_variants_record_their_settings_and_errors_and_no_errors_when_diverged(kd, tmp_path, tiny_root, monkeypatch):
    kd("train-teacher", "model.hidden=[16]", "epochs=2", f"hydra.run.dir={tmp_path / 't'}")
    out = tmp_path / "runs.jsonl"
    sgd = run_script(monkeypatch, tiny_root, tmp_path / "t" / "checkpoint.pt", out)
    assert (sgd["opt"], sgd["T"], sgd["alpha"], sgd["lr"], sgd["diverged"]) == ("sgd", 20.0, 0.1, 0.05, False)
    assert 0 <= sgd["val_errors"] <= 100 and 0 <= sgd["test_errors"] <= 200  # tiny_root: 200 test images
    assert sgd["val_errors"] < 90  # it learned (10 classes: chance is about 90 of 100)
    again = run_script(monkeypatch, tiny_root, tmp_path / "t" / "checkpoint.pt", out)
    assert (again["val_errors"], again["test_errors"]) == (sgd["val_errors"], sgd["test_errors"])  # same seed
    blown = run_script(monkeypatch, tiny_root, tmp_path / "t" / "checkpoint.pt", out, "--lr", "inf")
    assert blown["diverged"] and blown["val_errors"] is None and blown["test_errors"] is None
    assert len(out.read_text().splitlines()) == 3


def test_teacher_mc_targets_are_the_mean_of_dropout_samples_probabilities(kd, tmp_path):
    import torch

    from kd_cli.teachers import load_teacher

    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 't'}")
    teacher, _ = load_teacher(tmp_path / "t" / "checkpoint.pt", "cpu", 784, 10)
    x = torch.rand(50, 1, 28, 28)
    torch.manual_seed(3)
    got = load_script("paper_setup_variants").dropout_mean_log_probs(teacher, x, 4.0, 5).exp()
    assert not teacher.training  # left in eval mode, as it was given
    torch.manual_seed(3)  # by hand: the same five draws of the teacher in training mode, probabilities averaged
    teacher.train()
    with torch.no_grad():
        want = sum(torch.softmax(teacher(x).double() / 4.0, dim=-1) for _ in range(5)) / 5
    teacher.eval()
    assert torch.allclose(got.double(), want, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(got, torch.softmax(teacher(x) / 4.0, dim=-1), atol=1e-3)  # not the mean network


def test_teacher_mc_reaches_the_run_and_refuses_what_it_would_silently_override(kd, tmp_path, tiny_root, monkeypatch):
    import pytest

    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 't'}")
    script, calls = load_script("paper_setup_variants"), []
    real = script.dropout_mean_log_probs
    monkeypatch.setattr(script, "dropout_mean_log_probs", lambda *a: calls.append(a[2:]) or real(*a))
    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    base = ["x", "--teacher", str(tmp_path / "t" / "checkpoint.pt"), "--hidden", "16", "--val-size", "100",
            "--epochs", "1", "--warmup", "1"]
    monkeypatch.setattr(sys, "argv", [*base, "--teacher-mc", "3", "--T", "4"])
    script.main()
    assert calls == [(4.0, 3)]
    for bad in (["--teacher-mc", "-1"], ["--teacher-mc", "2", "--teacher-shifts", "1"],
                ["--teacher-mc", "2", "--teacher-dropout"]):
        monkeypatch.setattr(sys, "argv", [*base, *bad])
        with pytest.raises(SystemExit) as e:
            script.main()
        assert e.value.code == 2


def test_max_norm_caps_hidden_units_and_with_max_norm_out_the_output_units(kd, tmp_path, tiny_root, monkeypatch):
    import pytest

    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 't'}")
    script, students = load_script("paper_setup_variants"), []
    real_mlp = script.MLP
    monkeypatch.setattr(script, "MLP", lambda hidden: students.append(real_mlp(hidden)) or students[-1])
    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    base = ["x", "--teacher", str(tmp_path / "t" / "checkpoint.pt"), "--hidden", "16", "16", "--val-size", "100",
            "--epochs", "2", "--warmup", "1"]

    def row_norms(student):
        return [layer.weight.detach().norm(dim=1).max().item() for layer in [*student.hidden, student.out]]

    for flags in ([], ["--max-norm", "0.3"], ["--max-norm", "0.3", "--max-norm-out"]):
        monkeypatch.setattr(sys, "argv", [*base, *flags])
        script.main()
    free, hidden_capped, all_capped = (row_norms(s) for s in students)
    assert max(free[:2]) > 0.31 and free[2] > 0.31  # nn.Linear's initial rows are about 0.58 long
    assert max(hidden_capped[:2]) <= 0.3 + 1e-5 and hidden_capped[2] > 0.31  # kd's constraint: hidden units only
    assert max(all_capped) <= 0.3 + 1e-5
    for bad in (["--max-norm", "0"], ["--max-norm-out"]):
        monkeypatch.setattr(sys, "argv", [*base, *bad])
        with pytest.raises(SystemExit) as e:
            script.main()
        assert e.value.code == 2
