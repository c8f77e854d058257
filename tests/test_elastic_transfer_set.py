"""scripts/elastic_transfer_set.py: the distortion, and soft targets from the teacher on the very
distorted images the student learns from."""
import json
import sys

import torch

from kd_cli.models import MLP

from conftest import load_script


def test_no_distortion_leaves_images_and_a_small_one_keeps_a_flat_interior():
    elastic = load_script("elastic_transfer_set").elastic
    torch.manual_seed(0)
    x = torch.rand(4, 28, 28)
    torch.testing.assert_close(elastic(x, 0.0, 4.0), x)  # sampled exactly at the pixel centres
    ones = torch.ones(4, 28, 28)
    moved = elastic(ones, 0.9, 4.0)  # under a pixel: within 1 px of the border, zeros may come in
    torch.testing.assert_close(moved[:, 1:-1, 1:-1], ones[:, 1:-1, 1:-1])
    assert (elastic(x, 34.0, 4.0) - x).abs().max() > 0.3  # a full-size one moves the digits


def test_the_teacher_sees_each_distorted_batch_the_student_learns_from(kd, tmp_path, tiny_root, monkeypatch):
    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 't'}")
    seen = []  # (width, grad enabled, input) of every MLP forward

    def hook(module, args, output):
        if isinstance(module, MLP):
            seen.append((module.arch["hidden"][0], torch.is_grad_enabled(), args[0].detach().clone()))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    monkeypatch.setattr(sys, "argv", ["elastic_transfer_set.py", "--teacher", str(tmp_path / "t" / "checkpoint.pt"),
                                      "--hidden", "8", "--val-size", "100", "--epochs", "1", "--elastic-alpha", "34",
                                      "--json", str(tmp_path / "runs.jsonl")])
    try:
        load_script("elastic_transfer_set").main()
    finally:
        handle.remove()
    teacher = [x for width, grad, x in seen if width == 16]
    student = [x for width, grad, x in seen if width == 8 and grad]
    assert len(teacher) == len(student) == 5  # 500 training images, batch 100
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))
    # and they are distorted: MNIST's pixels are k / 255, bilinear resampling puts most in between
    off_grid = [((x * 255 - (x * 255).round()).abs() > 1e-3).float().mean() for x in student]
    assert min(off_grid) > 0.05
    result = json.loads((tmp_path / "runs.jsonl").read_text())
    assert result["elastic_alpha"] == 34.0 and 0 <= result["val_errors"] <= 100
