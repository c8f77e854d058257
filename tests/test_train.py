"""The training loop's schedule and repeatability."""
import math

import pytest
import torch

from kd_cli.losses import hard_label_loss
from kd_cli.models import MLP
from kd_cli.train import Recipe, train


def hinton2012():
    return Recipe(epochs=3000, batch_size=100, lr=10.0, momentum=0.99, momentum_start=0.5,
                  momentum_ramp_epochs=500, schedule="exponential", lr_decay=0.998,
                  lr_times_one_minus_momentum=True)


def test_hinton2012_schedule():
    r = hinton2012()
    lr, mom = r.at(0)
    assert mom == 0.5 and lr == pytest.approx(10 * 0.5)
    lr, mom = r.at(250.5)
    assert mom == pytest.approx(0.5 + 0.49 * 250.5 / 500)
    assert lr == pytest.approx(10 * 0.998 ** 250 * (1 - mom))
    lr, mom = r.at(1000)
    assert mom == pytest.approx(0.99) and lr == pytest.approx(10 * 0.998 ** 1000 * 0.01)


def test_onecycle_warms_up_then_anneals_to_zero():
    r = Recipe(epochs=10, batch_size=10, lr=0.2, schedule="onecycle", warmup_epochs=2)
    assert r.at(0)[0] == 0 and r.at(1)[0] == pytest.approx(0.1) and r.at(2)[0] == pytest.approx(0.2)
    assert r.at(6)[0] == pytest.approx(0.1) and r.at(10)[0] == pytest.approx(0, abs=1e-12)


def toy(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 28, 28, generator=g)
    y = (x[:, :14].sum((1, 2)) > x[:, 14:].sum((1, 2))).long()
    return x, y


def fit(seed, epochs=3, **kw):
    torch.manual_seed(seed)
    x, y = toy()
    m = MLP(hidden=[32], dropout_hidden=0.2)
    out = train(m, x, y, hard_label_loss,
                Recipe(epochs=epochs, batch_size=32, lr=0.1, schedule="cosine"),
                max_norm=2.0, jitter_pixels=1, **{"evaluate": lambda m: {"test_errors": 0}, **kw})
    return m, out


def test_same_seed_same_weights_and_loss_goes_down():
    (a, ha), (b, hb) = fit(0), fit(0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert ha["history"] == hb["history"]
    c, _ = fit(1)
    assert not torch.equal(a.out.weight, c.out.weight)
    _, long = fit(0, epochs=15)
    losses = [row["loss"] for row in long["history"][1:]]
    assert losses[-1] < losses[0] and all(math.isfinite(l) for l in losses)
    assert [row["epoch"] for row in long["history"]] == list(range(0, 16))  # 0: before training


def test_partial_last_batch_is_used():
    seen = []
    x, y = toy(70)
    m = MLP(hidden=[8])
    train(m, x, y, lambda z, t, _: (seen.append(len(t)), z.sum() * 0)[1],
          Recipe(epochs=1, batch_size=32, lr=0.1))
    assert seen == [32, 32, 6]


def test_targets_see_the_jittered_batch_the_model_sees_and_its_indices():
    torch.manual_seed(5)
    x, y = toy(64)
    seen = []

    class Recorder(MLP):
        def forward(self, xb):
            seen.append(xb.clone())
            return super().forward(xb)

    def loss_fn(z, yb, target):
        sums, idx = target
        torch.testing.assert_close(sums, seen[-1].flatten(1).sum(1))
        assert torch.equal(yb, y[idx])  # the labels and the indices are of the same images
        return torch.nn.functional.cross_entropy(z, yb)

    train(Recorder(hidden=[8]), x, y, loss_fn, Recipe(epochs=2, batch_size=16, lr=0.1),
          jitter_pixels=2, targets=lambda idx, xb: (xb.flatten(1).sum(1), idx))
    assert len(seen) == 8


@pytest.mark.parametrize("stop_during", ["evaluation", "batch"])
def test_a_stop_anywhere_resumes_to_the_untouched_run(tmp_path, stop_during):
    """A signal can land while an epoch's errors are counted (the stop then happens at step 0 of
    the next epoch, after its shuffle was drawn) or between batches; either way the resumed run
    must end where an untouched one does."""
    import os
    import signal

    from kd_cli.train import Interrupted

    untouched, ref = fit(0, epochs=4)
    calls = []

    def signal_once(step_or_epoch):
        calls.append(step_or_epoch)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # caught by train(): a stop request

    state = tmp_path / "state.pt"
    kw = {"state_path": state, "state_extra": {"stage": "train-teacher"}}
    if stop_during == "evaluation":
        kw["evaluate"] = lambda m: (signal_once(m), {"test_errors": 0})[1]
    else:
        kw["targets"] = lambda idx, xb: signal_once(xb)
    with pytest.raises(Interrupted):
        fit(0, epochs=4, **kw)
    resumed, out = fit(0, epochs=4, state_path=state, state_extra={"stage": "train-teacher"})
    for a, b in zip(resumed.parameters(), untouched.parameters()):
        assert torch.equal(a, b)
    assert out["history"] == ref["history"]


def test_clip_grad_norm_bounds_each_step():
    x, y = toy(32)
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        m = MLP(hidden=[8])
        before = [p.detach().clone() for p in m.parameters()]
        train(m, x, y, hard_label_loss,
              Recipe(epochs=1, batch_size=32, lr=1.0, momentum=0.0, momentum_start=0.0,
                     schedule="constant", clip_grad_norm=clip))
        step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(m.parameters(), before)))
        if clip is None:
            assert step > 1e-2  # unclipped, one step of lr 1 moves the weights far
        else:
            assert step <= clip * (1 + 1e-4)  # lr 1 x a gradient rescaled to norm 1e-3
