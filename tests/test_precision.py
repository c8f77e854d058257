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


def test_a_run_stopped_before_auto_existed_resumes_in_the_fp32_it_started_in(kd, native):
    """Its recorded config says precision=fp32 (the default then) and its state names no precision;
    the same command now composes auto, which here would be bf16."""
    native(False)
    stopped = kd.cwd / "stopped"
    proc = kd(*RUN, f"hydra.run.dir={stopped}", extra_env=signal_at(signal.SIGINT, 2, 5), check=False)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    state = load_checkpoint(stopped / "state.pt")
    del state["precision"], state["format_version"]
    save_checkpoint(stopped / "state.pt", state)
    recorded = stopped / ".hydra" / "config.yaml"
    recorded.write_text(recorded.read_text().replace("precision: auto", "precision: fp32"))
    native(True)
    kd(RUN[0], f"resume={stopped}")
    kd(*RUN, "precision=fp32", f"hydra.run.dir={kd.cwd / 'untouched'}")
    assert_same_run(stopped, kd.cwd / "untouched")
    assert json.loads((stopped / "metrics.json").read_text())["precision"] == "fp32"


def test_a_run_recorded_in_bf16_is_not_resumed_under_another_config(kd):
    """Only the fp32 -> auto step of the default is let through; any other change is refused."""
    stopped = kd.cwd / "stopped"
    kd(*RUN, f"hydra.run.dir={stopped}", extra_env=signal_at(signal.SIGINT, 2, 5), check=False)
    recorded = stopped / ".hydra" / "config.yaml"
    recorded.write_text(recorded.read_text().replace("precision: auto", "precision: bf16"))
    proc = kd(RUN[0], f"resume={stopped}", check=False)
    assert proc.returncode == 2 and "started with precision='bf16'" in proc.stderr


def test_training_refuses_a_precision_not_settled_on_its_device():
    from kd_cli.train import Recipe, train

    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        train(model, torch.zeros(8, 2, 2), torch.zeros(8, dtype=torch.long), lambda z, y, t: z.sum(),
              Recipe(epochs=1, batch_size=4, lr=0.1, precision="auto"))


@pytest.mark.parametrize("flags,native", [({"avx2", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True),
                                          ({"avx2", "avx512f"}, False), (set(), False)])
def test_a_cpu_is_native_by_its_bfloat16_flags(monkeypatch, flags, native):
    monkeypatch.setattr(prepare, "cpu_flags", lambda: flags)
    assert prepare.native_bf16(torch.device("cpu")) is native


def test_a_gpu_that_only_emulates_bfloat16_is_not_native(monkeypatch):
    asked = {}

    class On:
        def __init__(self, device):
            asked["device"] = device

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def is_bf16_supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return including_emulation  # a pre-Ampere GPU: bf16 only by emulation
    monkeypatch.setattr(torch.cuda, "device", On)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert prepare.native_bf16(torch.device("cuda", 1)) is False
    assert asked == {"device": torch.device("cuda", 1), "emulation": False}
