"""precision=auto, the default: bf16 where the device computes bfloat16 natively, fp32 elsewhere,
recorded as what ran; a resumed run keeps the precision it started with, whatever machine it
resumes on (auto could settle otherwise there), and a state saved before auto existed resumes in
the fp32 it was started in."""
import json
import signal

import pytest
import torch

from kd_cli import prepare
from kd_cli.checkpoint import load_checkpoint, save_checkpoint
from test_resume import RUN, assert_same_run, signal_at


@pytest.fixture
def native(monkeypatch):
    """native(flag): make this machine one with (True) or without (False) native bfloat16."""
    return lambda flag: monkeypatch.setattr(prepare, "native_bf16", lambda device: flag)


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["state_dict"]


@pytest.mark.parametrize("has_bf16,settles_to,other", [(True, "bf16", "fp32"), (False, "fp32", "bf16")])
def test_auto_is_bf16_exactly_where_the_device_computes_it_natively(kd, native, has_bf16, settles_to, other):
    native(has_bf16)
    proc = kd(*RUN, "epochs=1", f"hydra.run.dir={kd.cwd / 'auto'}")
    assert "kd: warning: precision" not in proc.stderr
    assert json.loads((kd.cwd / "auto" / "metrics.json").read_text())["precision"] == settles_to
    assert load_checkpoint(kd.cwd / "auto" / "checkpoint.pt")["config"]["precision"] == settles_to
    for precision in (settles_to, other):  # it trained as that precision does, and not as the other
        kd(*RUN, "epochs=1", f"precision={precision}", f"hydra.run.dir={kd.cwd / precision}", check=True)
    assert_same_run(kd.cwd / "auto", kd.cwd / settles_to)
    a, b = weights(kd.cwd / "auto"), weights(kd.cwd / other)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_precision_it_started_with_on_another_machine(kd, native):
    native(True)
    stopped = kd.cwd / "stopped"
    proc = kd(*RUN, f"hydra.run.dir={stopped}", extra_env=signal_at(signal.SIGINT, 2, 5), check=False)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    native(False)  # resumed where bfloat16 is emulated: still bf16, with the warning that says so
    assert "kd: warning: precision=bf16" in kd(RUN[0], f"resume={stopped}").stderr
    kd(*RUN, "precision=bf16", f"hydra.run.dir={kd.cwd / 'untouched'}")
    assert_same_run(stopped, kd.cwd / "untouched")
    assert json.loads((stopped / "metrics.json").read_text())["precision"] == "bf16"


def test_a_state_saved_before_auto_existed_resumes_in_fp32(kd, native):
    native(False)  # started as an fp32 run of the old default
    stopped = kd.cwd / "stopped"
    proc = kd(*RUN, f"hydra.run.dir={stopped}", extra_env=signal_at(signal.SIGINT, 2, 5), check=False)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    state = load_checkpoint(stopped / "state.pt")
    del state["precision"], state["format_version"]  # as states were saved before auto
    save_checkpoint(stopped / "state.pt", state)
    native(True)
    kd(RUN[0], f"resume={stopped}")
    kd(*RUN, "precision=fp32", f"hydra.run.dir={kd.cwd / 'untouched'}")
    assert_same_run(stopped, kd.cwd / "untouched")
    assert json.loads((stopped / "metrics.json").read_text())["precision"] == "fp32"
