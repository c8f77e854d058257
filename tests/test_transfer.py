"""Transfer-set controls and bias correction (the paper's omitted-class and little-data studies)."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from kd_cli import stages
from kd_cli.data import transfer_set
from kd_cli.errors import KDError
from kd_cli.evaluate import bias_correction, count_errors, errors_on, fit_bias_shift, shift_biases
from kd_cli.models import MLP

from conftest import load_script, plain_logits, write_idx


def labels_with_counts(counts):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(1))]


def test_exclude_and_include_keep_exactly_those_classes_in_order():
    y = labels_with_counts([30] * 10)
    x = torch.arange(300.).view(300, 1, 1).expand(300, 2, 2)  # each image remembers its index
    xe, ye, info = transfer_set(x, y, exclude=[3])
    assert 3 not in ye.tolist() and ye.numel() == 270 and info["classes"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert torch.all(xe[1:, 0, 0] > xe[:-1, 0, 0])  # training images keep their order
    assert torch.equal(y[xe[:, 0, 0].long()], ye)  # and their labels
    _, yi, info = transfer_set(x, y, include=[7, 8])
    assert sorted(set(yi.tolist())) == [7, 8] and info["size"] == 60
    _, yb, _ = transfer_set(x, y, include=[7, 8], exclude=[8])
    assert set(yb.tolist()) == {7}
    with pytest.raises(KDError, match="no class"):
        transfer_set(x, y, include=[3], exclude=[3])


def test_fraction_is_stratified_and_seeded():
    counts = [100, 200, 50, 400, 100, 100, 100, 100, 100, 100]
    y = labels_with_counts(counts)
    x = torch.arange(float(y.numel())).view(-1, 1, 1)
    xa, ya, info = transfer_set(x, y, fraction=0.1, seed=0)
    assert torch.bincount(ya, minlength=10).tolist() == [round(0.1 * n) for n in counts]
    assert info["size"] == ya.numel() == 135
    xb, _, _ = transfer_set(x, y, fraction=0.1, seed=0)
    xc, _, _ = transfer_set(x, y, fraction=0.1, seed=1)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    transfer_set(x, y, fraction=0.5, seed=3)
    assert torch.equal(before, torch.get_rng_state())  # the run's own RNG stream is untouched
    _, y17, _ = transfer_set(x[:170], labels_with_counts([17] * 10), fraction=0.1)
    assert torch.bincount(y17, minlength=10).tolist() == [2] * 10  # 1.7 images a class: rounded, not cut
    _, y1, _ = transfer_set(x, y, fraction=0.001)
    assert torch.bincount(y1, minlength=10).tolist() == [1] * 10  # never a class with no image


def test_a_digits_fraction_is_the_same_images_whichever_other_digits_are_kept():
    # omit-a-class with little data must compare the same 5s (and every other shared digit) as
    # little data alone: excluding or including other digits changes no kept digit's subset
    y = labels_with_counts([100] * 10)
    x = torch.arange(float(y.numel())).view(-1, 1, 1)

    def images_of(digit, **kw):
        xs, ys, _ = transfer_set(x, y, fraction=0.1, seed=7, **kw)
        return xs[ys == digit].flatten().tolist()

    fives = images_of(5)
    assert len(fives) == 10
    assert images_of(5, exclude=[0]) == images_of(5, exclude=[3, 4]) == images_of(5, include=[5, 7]) == fives
    assert images_of(5, include=[5]) == fives and images_of(7, include=[7, 8]) == images_of(7)


@pytest.fixture
def compose_cfg(tiny_root):
    def make(stage, *overrides):
        with initialize_config_module("kd_cli.conf", version_base="1.3"):
            return compose(stage.replace("-", "_"), overrides=[
                f"data.root={tiny_root}", "data.download=false", "model.hidden=[16]", "epochs=2",
                "batch_size=50", *overrides])
    return make


def run(stage, cfg, out_dir):
    out_dir.mkdir()  # Hydra makes the run folder; here the stage function is called directly
    return stages.STAGES[stage](cfg, out_dir)


@pytest.fixture
def seen_by_loss(monkeypatch):
    """Every target tensor the training loop hands the loss, batch by batch."""
    seen = []
    real = stages.train

    def spy(model, x, y, loss_fn, recipe, **kw):
        def recording(z, labels, target):
            seen.append((labels, target))
            return loss_fn(z, labels, target)
        return real(model, x, y, recording, recipe, **kw)

    monkeypatch.setattr(stages, "train", spy)
    return seen


def test_an_excluded_class_never_reaches_the_loss(compose_cfg, seen_by_loss, tmp_path):
    teacher = run("train-teacher", compose_cfg("train-teacher", "epochs=1"), tmp_path / "t")
    assert teacher["transfer"]["size"] == 600
    seen_by_loss.clear()
    ckpt = tmp_path / "t" / "checkpoint.pt"
    m = run("distill", compose_cfg("distill", f"teacher={ckpt}", "data.transfer.exclude=[3]"), tmp_path / "d")
    labels = torch.cat([t[0] for t in seen_by_loss])
    assert labels.numel() == 2 * m["transfer"]["size"] and 3 not in labels.tolist()
    assert m["transfer"]["classes"] == [0, 1, 2, 4, 5, 6, 7, 8, 9] and m["transfer"]["size"] < 600
    soft = torch.cat([t[1] for t in seen_by_loss])
    assert soft.shape == (labels.numel(), 10)  # soft targets of the transfer images only
    seen_by_loss.clear()
    m = run("train-student", compose_cfg("train-student", "data.transfer.include=[7,8]"), tmp_path / "s")
    assert set(torch.cat([t[0] for t in seen_by_loss]).tolist()) == {7, 8}
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["transfer"]["include"] == [7, 8]


def test_alpha_zero_never_hands_the_labels_to_the_loss(compose_cfg, seen_by_loss, tmp_path):
    run("train-teacher", compose_cfg("train-teacher", "epochs=1"), tmp_path / "t")
    seen_by_loss.clear()
    run("distill", compose_cfg("distill", f"teacher={tmp_path / 't' / 'checkpoint.pt'}", "alpha=0"), tmp_path / "d")
    assert seen_by_loss and all(labels is None and target.is_floating_point() for labels, target in seen_by_loss)


@pytest.mark.parametrize("stage", ["distill", "train-student"])
def test_experiment_presets_compose(compose_cfg, stage):
    cfg = compose_cfg(stage, "experiment=omit3")
    assert list(cfg.data.transfer.exclude) == [3] and cfg.data.val_size == 10000
    assert list(compose_cfg(stage, "experiment=only78").data.transfer.include) == [7, 8]
    assert compose_cfg(stage, "experiment=little_data").data.transfer.fraction == 0.03


def test_a_bias_shift_is_a_shift_of_the_output_bias():
    torch.manual_seed(0)
    model, x = MLP(hidden=[8]).eval(), torch.rand(20, 28, 28)
    logits = model(x).detach()
    with torch.no_grad():
        model.out.bias[3] += 3.5
        model.out.bias[7] -= 1.0
    torch.testing.assert_close(shift_biases(logits, {3: 3.5, 7: -1.0}), model(x).detach())


def test_fit_finds_a_known_shift():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=g)
    # right answer by a margin of 1 (+ noise below 0.2), then class 3 pushed down by exactly 5:
    # any shift in about (4.2, 5.8) makes no errors, and the fit takes the middle of that range
    logits = torch.nn.functional.one_hot(labels, 10).float() + 0.2 * torch.rand(2000, 10, generator=g)
    logits[:, 3] -= 5
    shift, errors = fit_bias_shift(logits, labels, [3])
    assert errors == 0 and abs(shift - 5) < 0.3
    counts = {"per_class_errors": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
    assert errors_on(counts, [3, 7], labels)["errors"] == 10
    assert errors_on(counts, [3, 7], labels)["images"] == int(((labels == 3) | (labels == 7)).sum())
    # two classes share one shift, as the paper's -7.6 on both the 7- and 8-bias
    logits[:, 3] += 5
    logits[:, [7, 8]] += 3
    shift, errors = fit_bias_shift(logits, labels, [7, 8])
    assert errors == 0 and abs(shift + 3) < 0.3


def test_the_fit_resolves_a_range_of_good_shifts_narrower_than_a_tenth():
    """A 3 that needs the shift above 5.01 and a 0 that needs it below 5.09: only shifts in
    (5.01, 5.09) make no errors. The grid's step (0.05) finds 5.05; a coarser grid finds none."""
    logits = torch.full((2, 10), -100.0)
    logits[0, 0], logits[0, 3] = 0.0, -5.01  # label 3: right once the shift passes 5.01
    logits[1, 0], logits[1, 3] = 0.0, -5.09  # label 0: right while the shift stays under 5.09
    shift, errors = fit_bias_shift(logits, torch.tensor([3, 0]), [3])
    assert errors == 0 and abs(shift - 5.05) < 1e-4  # float32 grid: 5.050001


def test_the_fitted_correction_raises_the_bias_it_fits_and_counts_on_validation():
    """bias_correction(fit_classes=[3]) with validation logits whose class 3 sits 5 too low: the
    shift is about +5, the test logits come back with exactly that added to column 3, and the
    errors before and after are counted on the validation split."""
    g = torch.Generator().manual_seed(0)
    val_y, test_y = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (300,), generator=g)
    val = torch.nn.functional.one_hot(val_y, 10).float() + 0.2 * torch.rand(500, 10, generator=g)
    val[:, 3] -= 5
    test = torch.randn(300, 10, generator=g)
    shifted, record = bias_correction(test, test_y, fit_classes=[3], val_logits=val, val_y=val_y)
    value = record["shift"]["3"]
    assert 4.7 < value < 5.3
    expected = test.clone()
    expected[:, 3] += value
    torch.testing.assert_close(shifted, expected)
    assert record["val_size"] == 500
    assert record["val_errors_before"] == int((val.argmax(1) != val_y).sum()) == int((val_y == 3).sum())
    assert record["val_errors_after"] == 0
    assert record["before"]["test_errors"] == int((test.argmax(1) != test_y).sum())
    wrong = expected.argmax(1) != test_y  # after: the errors of the shifted logits, counted by hand
    assert record["after"]["test_errors"] == int(wrong.sum())
    assert record["after"]["on_shifted_classes"] == {"errors": int(wrong[test_y == 3].sum()),
                                                     "images": int((test_y == 3).sum())}


def test_the_confusion_matrix_has_true_classes_as_rows():
    counts = count_errors(torch.eye(3)[[0, 1, 1, 2]] * 5, torch.tensor([0, 0, 1, 2]), num_classes=3)
    assert counts["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # a true 0 called 1: row 0, column 1
    assert counts["per_class_errors"] == [1, 0, 0] and counts["test_errors"] == 1


def test_fitting_the_bias_never_reads_the_test_set(kd, tiny_root, tmp_path):
    """The same student, evaluated against two data roots that differ only in their test set,
    fits the same shift on the same validation errors; only the test errors differ."""
    kd("train-student", "model.hidden=[16]", "epochs=3", "data.val_size=200", "data.transfer.exclude=[3]",
       f"hydra.run.dir={tmp_path / 'student'}")
    other = tmp_path / "other-root"
    shutil.copytree(tiny_root, other)
    rng = np.random.default_rng(7)
    raw = other / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (200, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 200))
    results = []
    for root in (tiny_root, other):
        run_dir = tmp_path / f"eval-{root.name}"
        kd("evaluate", f"checkpoint={tmp_path / 'student' / 'checkpoint.pt'}", "fit_bias=[3]",
           f"hydra.run.dir={run_dir}", extra_env={"KD_DATA_ROOT": str(root)})
        results.append(json.loads((run_dir / "metrics.json").read_text()))
    a, b = (r["bias"] for r in results)
    assert a["shift"] == b["shift"] and a["val_errors_after"] == b["val_errors_after"]
    assert a["val_size"] == 200 and a["val_held_out_from_training"]
    assert a["before"]["test_errors"] != b["before"]["test_errors"]  # the test sets did differ
    assert a["after"]["on_shifted_classes"]["errors"] <= a["before"]["on_shifted_classes"]["errors"]


def test_evaluate_reports_the_errors_of_the_shifted_biases(kd, tiny_root, tmp_path):
    """A given shift (the paper's way) and a fitted one: the errors kd evaluate reports, total and
    on class 3, are those of the checkpoint's plain logits with the shift added to class 3's."""
    from kd_cli.data import load_data

    kd("train-student", "model.hidden=[16]", "epochs=3", "data.val_size=200", "data.transfer.exclude=[3]",
       f"hydra.run.dir={tmp_path / 'student'}")
    ckpt = tmp_path / "student" / "checkpoint.pt"
    _, _, test_x, test_y = load_data(tiny_root)
    plain = plain_logits(ckpt, test_x)
    for name, arg in (("given", "bias_shift={3:2.5}"), ("fitted", "fit_bias=[3]")):
        kd("evaluate", f"checkpoint={ckpt}", arg, f"hydra.run.dir={tmp_path / name}")
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        shift = m["bias"]["shift"]["3"]
        if name == "given":
            assert shift == 2.5
        shifted = plain.clone()
        shifted[:, 3] += shift
        for logits, when in ((plain, "before"), (shifted, "after")):
            wrong = logits.argmax(1) != test_y
            assert m["bias"][when]["test_errors"] == int(wrong.sum()), (name, when)
            assert m["bias"][when]["on_shifted_classes"]["errors"] == int(wrong[test_y == 3].sum()), (name, when)
        assert m["test_errors"] == m["bias"]["after"]["test_errors"]  # the run's result is the shifted model's
        assert m["bias"]["before"]["test_errors"] != m["bias"]["after"]["test_errors"]  # the shift did move it


def test_fit_bias_needs_a_validation_split(kd):
    kd("train-student", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={kd.cwd / 's'}")
    proc = kd("evaluate", f"checkpoint={kd.cwd / 's' / 'checkpoint.pt'}", "fit_bias=[3]", check=False)
    assert proc.returncode == 2 and "data.val_size" in proc.stderr and "Traceback" not in proc.stderr


def test_the_transfer_scripts_tables_show_the_papers_shifts_and_the_runs_numbers(tmp_path, monkeypatch):
    """scripts/transfer_experiments.py with kd replaced by canned metrics: the paper's bias shifts
    reach kd evaluate with their signs (+3.5 on the 3-bias; -7.6 on the 7- and 8-biases), each
    table cell shows the number of the run and the moment (before, after) it names, and the
    early-stopped column is the test errors at the epoch with the fewest validation errors."""
    script = load_script("transfer_experiments")
    calls = []

    def bias(before, after, on):  # 505 test 3s: the run's count, not the paper's 1,010
        return {"bias": {"before": {"test_errors": before, "on_shifted_classes": {"errors": on[0], "images": 505}},
                         "after": {"test_errors": after, "on_shifted_classes": {"errors": on[1], "images": 505}},
                         "shift": {"3": 2.25, "7": -5.0}, "val_errors_before": 9, "val_errors_after": 8,
                         "val_size": 100}}

    def fake_kd(stage, run_dir, *overrides):
        calls.append((stage, Path(run_dir).name, overrides))
        if stage == "evaluate":  # a test set of 5,000 images (data.test_limit): percentages are of it
            shifted = bias(400, 180, (300, 30)) if Path(run_dir).name == "paper-shift" else bias(400, 150, (300, 20))
            return {**shifted, "test_total": 5000}
        history = [{"epoch": 1, "val_errors": 40, "test_errors": 70}, {"epoch": 2, "val_errors": 40, "test_errors": 90},
                   {"epoch": 3, "val_errors": 45, "test_errors": 60}, {"epoch": 4, "loss": 0.1}]  # not counted (eval_every)
        return {"transfer": {"size": 50, "classes": [0, 1]}, "T": 20.0, "alpha": 0.1, "wall_seconds": 1.0,
                "epochs": 3, "test_errors": 60, "history": history}
    monkeypatch.setattr(script, "kd", fake_kd)

    omit3 = "\n".join(script.omit3(tmp_path, [], []))
    assert [c[2][1] for c in calls if c[1] == "paper-shift"] == ["bias_shift={3:3.5}"]
    assert [c[2][1] for c in calls if c[1] == "fitted-shift"] == ["fit_bias=[3]"]
    assert "| test errors | 206 (133 of 1010 3s) | 400 (300 of 505 3s) |" in omit3
    assert "+3.5 (the paper's value) | 109 (14 of 1010 3s) | 180 (30 of 505 3s) |" in omit3
    assert "+2.25, fitted on the validation split | - | 150 (20 of 505 3s) |" in omit3
    calls.clear()
    only78 = "\n".join(script.only78(tmp_path, [], []))
    assert [c[2][1] for c in calls if c[1] == "paper-shift"] == ["bias_shift={7:-7.6,8:-7.6}"]
    assert [c[2][1] for c in calls if c[1] == "fitted-shift"] == ["fit_bias=[7,8]"]
    assert "-7.6 (the paper's value) | 13.2% | 3.6% (180 errors) |" in only78
    calls.clear()
    little = script.little_data(tmp_path, [], [])
    # the three runs the table's rows name: soft targets alone (no labels read), and hard labels on
    # the same 3% and on every training image
    runs = {name: (stage, set(overrides)) for stage, name, overrides in calls}
    assert runs["soft-3pct"][0] == "distill" and {"experiment=little_data", "alpha=0"} <= runs["soft-3pct"][1]
    assert runs["hard-3pct"][0] == "train-student" and "experiment=little_data" in runs["hard-3pct"][1]
    assert runs["hard-100pct"][0] == "train-student" and not any("little_data" in o for o in runs["hard-100pct"][1])
    # epochs 1 and 2 tie on validation: the later one is reported (it trained longer)
    assert all(line.endswith("| 60 | 90 (epoch 2) |") for line in little if line.startswith("| hard") or
               line.startswith("| soft"))


def test_the_width_table_puts_each_runs_errors_in_its_width_and_T_cell_and_bolds_each_widths_fewest(tmp_path, monkeypatch):
    """scripts/transfer_experiments.py width_vs_T with the sweeps' rows canned: every (width, T)
    run lands in its own cell, a run not done shows as '-', and the bold is each row's minimum."""
    script = load_script("transfer_experiments")
    monkeypatch.setattr(script, "run", lambda *a: None)
    errors = {(w, t): 1000 + 10 * i + j for i, w in enumerate(script.WIDTHS) for j, t in enumerate(script.WIDTH_TS)}
    errors[(script.WIDTHS[0], script.WIDTH_TS[3])] = 7  # the fewest of the first width, mid-row
    del errors[(script.WIDTHS[1], script.WIDTH_TS[0])]  # a job not done
    rows = {"sweep": [{"values": {"model.hidden": f"[{w},{w}]", "T": f"{t:g}", "alpha": 0.3}, "test_errors": e}
                      for (w, t), e in errors.items()],
            "hard": [{"values": {"model.hidden": f"[{w},{w}]"}, "test_errors": 500 + w} for w in script.WIDTHS]}
    monkeypatch.setattr(script, "done_rows", lambda folder: rows[Path(folder).name])
    lines = script.width_vs_T(tmp_path, [], [])
    for i, w in enumerate(script.WIDTHS):
        cells = [errors.get((w, t), "-") for t in script.WIDTH_TS]
        fewest = min(c for c in cells if c != "-")
        want = f"| {w} | {500 + w} | " + " | ".join(f"**{c}**" if c == fewest else str(c) for c in cells) + " |"
        assert want in lines
    assert f"| {script.WIDTHS[0]} | {500 + script.WIDTHS[0]} | 1000 | 1001 | 1002 | **7** |" in "\n".join(lines)
    assert "distilled with alpha=0.3 " in lines[-1]  # the runs' own alpha (an --extra may set it), not 0.1


# one shift fitted for several classes (the paper's 7s and 8s) goes on each of them
def test_a_fitted_shift_is_added_to_every_class_it_was_fitted_for():
    g = torch.Generator().manual_seed(0)
    val_y, test_y = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (300,), generator=g)
    val = F.one_hot(val_y, 10).float() + 0.2 * torch.rand(500, 10, generator=g)
    val[:, [7, 8]] -= 4  # both classes sit 4 too low: any shift in about (3.2, 4.8) makes no errors
    test = torch.randn(300, 10, generator=g)
    shifted, record = bias_correction(test, test_y, fit_classes=[8, 7], val_logits=val, val_y=val_y)
    assert set(record["shift"]) == {"7", "8"} and record["shift"]["7"] == record["shift"]["8"]
    assert 3.7 < record["shift"]["7"] < 4.3 and record["val_errors_after"] == 0
    expected = test.clone()
    expected[:, [7, 8]] += record["shift"]["7"]
    torch.testing.assert_close(shifted, expected)
    assert record["after"]["on_shifted_classes"]["images"] == int(((test_y == 7) | (test_y == 8)).sum())


@pytest.mark.parametrize("extra", ["seed=0,1", "T=range(2,4)", "lr=interval(0.1,1)"])
def test_the_transfer_script_refuses_a_sweep_in_extra(extra, monkeypatch, capsys, tmp_path):
    # width_vs_T keeps one run per (width, T) cell: a swept seed would silently keep only the last
    script = load_script("transfer_experiments")
    monkeypatch.setattr(script, "run", lambda *a: pytest.fail("ran a kd command"))
    monkeypatch.setattr(sys, "argv", ["transfer_experiments.py", "width_vs_T", "--extra", f"epochs=1 {extra}",
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert f"--extra {extra} is a sweep" in str(e.value) and not (tmp_path / "out").exists()
