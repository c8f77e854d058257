"""The training loop's schedule and repeatability."""
import math
import os
import signal

import pytest
import torch

from conftest import moved_by_hand

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


def test_cosine_anneals_over_all_epochs_and_exponential_decays_per_whole_epoch():
    r = Recipe(epochs=10, batch_size=10, lr=0.2, schedule="cosine")
    assert r.at(0)[0] == pytest.approx(0.2) and r.at(5)[0] == pytest.approx(0.1)
    assert r.at(10)[0] == pytest.approx(0, abs=1e-12)
    assert r.at(2.5)[0] == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    h = hinton2012()  # lr 10 * 0.998^floor(epoch) * (1 - momentum): constant within an epoch
    for t, whole in ((0.75, 0), (1.5, 1), (1.99, 1)):
        lr, mom = h.at(t)
        assert lr == pytest.approx(10 * 0.998 ** whole * (1 - mom))


def test_the_schedule_moves_at_every_step_not_every_epoch(monkeypatch):
    """64 images at batch 16: 4 steps an epoch, step s of epoch e at t = e + s/4. One warm-up
    epoch to 0.4, then a cosine over the second: the lr each optimizer step used, by hand."""
    seen, step = [], torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    x, y = toy(64)
    train(MLP(hidden=[8]), x, y, hard_label_loss,
          Recipe(epochs=2, batch_size=16, lr=0.4, schedule="onecycle", warmup_epochs=1))
    expected = [0.4 * k / 4 for k in range(4)] + [0.2 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx(expected)


def test_every_step_uses_the_ramped_momentum_and_its_lr(monkeypatch):
    """The cited recipe's shape on 64 images at batch 16 (4 steps an epoch, step k at t = k/4):
    momentum 0.5 -> 0.99 over the first epoch, lr 10 halved per whole epoch times (1 - momentum).
    What each optimizer step was handed, against the formula written out by hand."""
    seen, step = [], torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["momentum"]))
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    x, y = toy(64)
    train(MLP(hidden=[8]), x, y, lambda z, t, _: z.sum() * 0,  # no gradient: only the schedule acts
          Recipe(epochs=3, batch_size=16, lr=10.0, momentum=0.99, momentum_start=0.5, momentum_ramp_epochs=1,
                 schedule="exponential", lr_decay=0.5, lr_times_one_minus_momentum=True))
    expected = []
    for k in range(12):
        momentum = 0.5 + 0.49 * min(1.0, k / 4)
        expected.append((10 * 0.5 ** (k // 4) * (1 - momentum), momentum))
    assert [lr for lr, _ in seen] == pytest.approx([lr for lr, _ in expected])
    assert [m for _, m in seen] == pytest.approx([m for _, m in expected])


def test_without_a_ramp_the_momentum_is_the_configured_one_not_its_start():
    # momentum_start only matters during a ramp: `optim.momentum=0.5` with no ramp trains at 0.5
    r = Recipe(epochs=2, batch_size=10, lr=0.1, momentum=0.5, momentum_start=0.9, momentum_ramp_epochs=0,
               schedule="constant")
    assert [r.at(t) for t in (0, 1.5)] == [(0.1, 0.5), (0.1, 0.5)]


@pytest.mark.parametrize("nesterov", [False, True])
def test_nesterov_momentum_and_weight_decay_act_on_the_first_step(nesterov):
    """loss = sum of the logits: the output bias's gradient is the batch size B for every class,
    plus weight decay wd * b. SGD's first step puts that gradient g in the momentum buffer, and
    moves b by lr * g, or by lr * (1 + momentum) * g with Nesterov momentum."""
    torch.manual_seed(0)
    x, y = toy(20)
    m = MLP(hidden=[8])
    b0 = m.out.bias.detach().clone()
    lr, momentum, wd = 0.01, 0.9, 0.1
    train(m, x, y, lambda z, t, _: z.sum(),
          Recipe(epochs=1, batch_size=20, lr=lr, momentum=momentum, momentum_start=momentum,
                 nesterov=nesterov, weight_decay=wd, schedule="constant"))
    g = 20 + wd * b0
    torch.testing.assert_close(m.out.bias.detach(), b0 - lr * (1 + momentum * nesterov) * g)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("sgd_update", ["fused", "foreach"])
def test_both_sgd_updates_accumulate_momentum_as_written_by_hand(sgd_update, nesterov):
    """loss = sum of the logits: the output bias's gradient is the batch size B at every step. With
    buf_1 = g and buf_k = momentum_k * buf_(k-1) + g, each step moves b by lr_k * buf_k, or with
    Nesterov momentum by lr_k * (g + momentum_k * buf_k); the momentum ramps and the lr halves per
    epoch, so each step's own values must be the ones used."""
    x, y = toy(20)
    m = MLP(hidden=[8])
    b = m.out.bias.detach().clone().double()
    recipe = Recipe(epochs=3, batch_size=20, lr=0.01, momentum=0.9, momentum_start=0.5, momentum_ramp_epochs=2,
                    nesterov=nesterov, schedule="exponential", lr_decay=0.5, sgd_update=sgd_update)
    train(m, x, y, lambda z, t, _: z.sum(), recipe)
    g, buf = 20.0, None
    for k in range(3):
        lr, momentum = recipe.at(k)
        buf = g if buf is None else momentum * buf + g
        b -= lr * (g + momentum * buf if nesterov else buf)
    torch.testing.assert_close(m.out.bias.detach().double(), b, rtol=0, atol=1e-5)


def test_sgd_update_chooses_torchs_implementation(monkeypatch):
    made, real = [], torch.optim.SGD.__init__

    def recording(self, params, **kwargs):
        made.append({k: kwargs.get(k) for k in ("fused", "foreach")})
        real(self, params, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "__init__", recording)
    x, y = toy(20)
    for update in ("fused", "foreach"):
        train(MLP(hidden=[8]), x, y, hard_label_loss, Recipe(epochs=1, batch_size=20, lr=0.1, sgd_update=update))
    assert made == [{"fused": True, "foreach": None}, {"fused": None, "foreach": True}]
    with pytest.raises(ValueError, match="sgd_update"):
        train(MLP(hidden=[8]), x, y, hard_label_loss, Recipe(epochs=1, batch_size=20, lr=0.1, sgd_update="adam"))


def test_eval_every_counts_errors_every_nth_epoch_and_the_last_and_changes_no_weight():
    (a, every), (b, third) = fit(0, epochs=7), fit(0, epochs=7, eval_every=3)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert [r["epoch"] for r in third["history"] if "test_errors" in r] == [0, 3, 6, 7]
    assert [r.get("loss") for r in third["history"]] == [r.get("loss") for r in every["history"]]  # every epoch


def test_max_norm_holds_before_every_step_not_only_at_the_end():
    """A large lr breaks the limit at every step; the constraint must restore it after each one,
    so every forward after the first sees hidden units of norm <= max_norm."""
    torch.manual_seed(0)
    x, y = toy(128)
    m, norms = MLP(hidden=[16, 16]), []
    m.hidden[0].register_forward_pre_hook(
        lambda layer, args: norms.append(float(layer.weight.detach().norm(dim=1).max())) if layer.training else None)
    train(m, x, y, hard_label_loss, Recipe(epochs=2, batch_size=16, lr=5.0, schedule="constant"), max_norm=0.5)
    assert len(norms) == 16 and norms[0] > 0.5  # the initial weights are beyond it...
    assert max(norms[1:]) <= 0.5 * (1 + 1e-5)  # ...and after every step they are within it


def test_each_epoch_draws_new_shifts():
    """Images with one lit pixel each, at the centre and with its own brightness: where the pixel
    lands in a forward is the image's shift that epoch. A new draw per epoch keeps an image's shift
    from one epoch to the next for about 1 in 25 images; a draw made once would keep all of them."""
    n, epochs = 64, 3
    x = torch.zeros(n, 28, 28)
    x[:, 14, 14] = torch.arange(1, n + 1) / n
    where = [dict() for _ in range(epochs)]

    class Recorder(MLP):
        def forward(self, xb):
            if self.training:
                flat = xb.flatten(1)
                epoch = next(e for e in range(epochs) if len(where[e]) < n)
                for row in flat:
                    where[epoch][round(float(row.max()) * n)] = int(row.argmax())
            return super().forward(xb)

    torch.manual_seed(0)
    train(Recorder(hidden=[4]), x, torch.zeros(n, dtype=torch.long), hard_label_loss,
          Recipe(epochs=epochs, batch_size=16, lr=0.1), jitter_pixels=2)
    assert all(sorted(w) == list(range(1, n + 1)) for w in where)  # every image, once an epoch
    offsets = {divmod(pos, 28) for w in where for pos in w.values()}
    assert offsets <= {(14 + dy, 14 + dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    kept = sum(where[e][i] == where[e + 1][i] for e in range(epochs - 1) for i in range(1, n + 1))
    assert kept < 0.2 * n * (epochs - 1)  # about 5 of 128 by chance


def test_each_epoch_draws_a_new_order_of_every_image():
    """The indices the soft targets are asked for, batch by batch: each epoch is every image once,
    and the order differs between epochs (an order drawn once would repeat with chance 1 / 64!)."""
    n, epochs, seen = 64, 3, []
    x, y = toy(n)
    torch.manual_seed(0)
    train(MLP(hidden=[4]), x, y, lambda z, t, _: hard_label_loss(z, t),
          Recipe(epochs=epochs, batch_size=16, lr=0.1), targets=lambda idx, xb, shifts: seen.append(idx.clone()))
    orders = [torch.cat(seen[e * 4:(e + 1) * 4]).tolist() for e in range(epochs)]
    assert len(seen) == epochs * 4 and all(sorted(o) == list(range(n)) for o in orders)
    assert len({tuple(o) for o in orders}) == epochs


def test_each_epoch_draws_its_order_then_its_jitter_codes_from_the_seeded_rng():
    """What makes a run repeat bit for bit (and a recorded run repeat on a new version): per epoch,
    one randperm of the set, then one randint of the 25 codes, from the global RNG, in that order;
    the batches are slices of both. The expectation is those plain torch calls, not kd's."""
    x, y = toy(64)
    model, seen = MLP(hidden=[4]), []
    torch.manual_seed(3)
    train(model, x, y, lambda z, t, _: z.sum() * 0, Recipe(epochs=2, batch_size=16, lr=0.1), jitter_pixels=2,
          targets=lambda idx, xb, shifts: seen.append((idx.clone(), shifts.clone())))
    torch.manual_seed(3)
    for epoch in range(2):
        order, codes = torch.randperm(64), torch.randint(0, 25, (64,))
        batches = seen[4 * epoch:4 * epoch + 4]
        assert torch.equal(torch.cat([idx for idx, _ in batches]), order)
        assert torch.equal(torch.cat([shifts for _, shifts in batches]), codes)


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


def moved(image, code):
    """An image moved by its 2-px jitter code, by hand: code k moves it (2 - k // 5, 2 - k % 5) px."""
    return moved_by_hand(image, 2 - code // 5, 2 - code % 5)


def test_targets_see_the_jittered_batch_the_model_sees_and_its_indices():
    torch.manual_seed(5)
    x, y = toy(64)
    seen = []

    class Recorder(MLP):
        def forward(self, xb):
            seen.append(xb.clone())
            return super().forward(xb)

    def loss_fn(z, yb, target):
        sums, idx, shifts = target
        torch.testing.assert_close(sums, seen[-1].flatten(1).sum(1))
        assert torch.equal(yb, y[idx])  # the labels and the indices are of the same images
        # the codes the targets are told are the shifts the model saw, image by image
        assert torch.equal(seen[-1], torch.stack([moved(x[i], int(k)) for i, k in zip(idx, shifts)]))
        return torch.nn.functional.cross_entropy(z, yb)

    train(Recorder(hidden=[8]), x, y, loss_fn, Recipe(epochs=2, batch_size=16, lr=0.1),
          jitter_pixels=2, targets=lambda idx, xb, shifts: (xb.flatten(1).sum(1), idx, shifts))
    assert len(seen) == 8


def test_unjittered_targets_see_the_images_the_model_sees():
    seen, checked = [], []
    x, y = toy(40)

    class Recorder(MLP):
        def forward(self, xb):
            seen.append(xb.clone())
            return super().forward(xb)

    def loss_fn(z, yb, idx):
        assert torch.equal(seen[-1], x[idx]) and torch.equal(yb, y[idx])
        checked.append(len(idx))
        return z.sum() * 0

    torch.manual_seed(2)
    train(Recorder(hidden=[4]), x, y, loss_fn, Recipe(epochs=2, batch_size=16, lr=0.1),
          targets=lambda idx, xb, shifts: idx)
    assert checked == [16, 16, 8] * 2


def sigint_on_second_call():
    """A callable that sends this process SIGINT the second time it is called, which train()
    takes as a stop request; the first call passes (as an evaluation: the untrained model's,
    before train() installs its handler)."""
    calls = []

    def call():
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
    return call


@pytest.mark.parametrize("stop_during", ["evaluation", "batch"])
def test_a_stop_anywhere_resumes_to_the_untouched_run(tmp_path, stop_during):
    """A signal can land while an epoch's errors are counted (the stop then happens at step 0 of
    the next epoch, after its shuffle was drawn) or between batches; either way the resumed run
    must end where an untouched one does."""
    from kd_cli.stopping import Interrupted

    untouched, ref = fit(0, epochs=4)
    signal_once = sigint_on_second_call()
    state = tmp_path / "state.pt"
    kw = {"state_path": state, "state_extra": {"stage": "train-teacher"}}
    if stop_during == "evaluation":
        kw["evaluate"] = lambda m: (signal_once(), {"test_errors": 0})[1]
    else:
        kw["targets"] = lambda idx, xb, shifts: signal_once()
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


def test_the_wall_time_a_run_returns_is_its_earlier_invocations_from_their_stages_start(tmp_path):
    """train() returns the wall time of the invocations before this one (the stage adds its own),
    each counted from `started`, the moment its stage began (data loading and soft targets come
    before the loop), to its last saved state."""
    import time

    from kd_cli.stopping import Interrupted

    _, fresh = fit(0, epochs=2)
    assert fresh["earlier_wall_seconds"] == 0 and fresh["invocations"] == 1  # nothing came before

    state, signal_once = tmp_path / "state.pt", sigint_on_second_call()
    stop = lambda m: (signal_once(), {"test_errors": 0})[1]  # noqa: E731 (epoch 0's errors, then epoch 1's)
    begun = time.perf_counter()
    with pytest.raises(Interrupted):  # as if its stage had begun 1000 s before the loop
        fit(0, epochs=4, state_path=state, state_extra={"stage": "train-teacher"}, evaluate=stop,
            started=begun - 1000)
    first = time.perf_counter() - begun
    t0 = time.perf_counter()
    _, out = fit(0, epochs=4, state_path=state, state_extra={"stage": "train-teacher"}, started=t0)
    assert out["invocations"] == 2
    assert 1000 <= out["earlier_wall_seconds"] <= 1000 + first  # the first one only, from its stage's start


def fit_averaged(epochs=5, last=3, **kw):
    """fit() with weight averaging over the last `last` epochs, recording every epoch's end weights
    (evaluate runs once per epoch end on the live model, then once more on the average)."""
    torch.manual_seed(0)
    x, y = toy()
    m, ends = MLP(hidden=[32], dropout_hidden=0.2), []

    def evaluate(model):
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"test_errors": int(model.out.weight.abs().sum() * 1000)}  # a number that tells weights apart

    out = train(m, x, y, hard_label_loss, Recipe(epochs=epochs, batch_size=32, lr=0.1, schedule="cosine",
                                                  average_last_epochs=last),
                max_norm=2.0, jitter_pixels=1, evaluate=evaluate, **kw)
    return m, out, ends


def test_weight_averaging_ends_with_the_plain_mean_of_the_last_epochs_weights():
    m, out, ends = fit_averaged(epochs=5, last=3)
    # evaluate's calls: untrained, epochs 1-2 live, then epochs 3-5 live and averaged in turn (9)
    assert len(ends) == 9
    live = [ends[0], ends[1], ends[2], ends[3], ends[5], ends[7]]
    for k, v in m.state_dict().items():  # the final model is the mean of epochs 3, 4, 5's ends, in float64
        expected = sum(e[k].double() for e in live[3:]) / 3
        torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(v, live[5][k])  # and not the last epoch's weights
    for k in ends[6]:  # after epoch 4 the average is of epochs 3 and 4
        torch.testing.assert_close(ends[6][k].double(), (live[3][k].double() + live[4][k].double()) / 2,
                                   rtol=1e-6, atol=1e-7)
    assert [sorted(r) for r in out["history"][3:]] == [["epoch", "loss", "test_errors", "test_errors_avg"]] * 3
    assert "test_errors_avg" not in out["history"][2]
    norms = m.hidden[0].weight.norm(dim=1)  # a mean of max-norm-obeying rows obeys it too
    assert bool((norms <= 2.0 + 1e-5).all())


def test_weight_averaging_leaves_the_live_trajectory_as_a_run_without_it():
    # averaging only reads the live weights: every epoch's end is bit for bit the plain run's
    _, plain_out, plain = fit_averaged(last=0)
    _, out, ends = fit_averaged(last=3)
    live = ends[:4] + ends[5::2]  # epochs 3-5 also evaluate the average, once each
    assert len(plain) == len(live) == 6
    for a, b in zip(plain, live):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_errors"] for r in out["history"]] == [r["test_errors"] for r in plain_out["history"]]


def test_weight_averaging_resumes_to_the_untouched_run(tmp_path, monkeypatch):
    from kd_cli.stopping import Interrupted

    untouched, ref, _ = fit_averaged()
    state = tmp_path / "state.pt"
    monkeypatch.setenv("KD_TEST_SIGNAL_AT", "SIGINT@4:3")  # inside the averaging window (epochs 3-5)
    with pytest.raises(Interrupted):
        fit_averaged(state_path=state, state_extra={"stage": "train-teacher"})
    monkeypatch.delenv("KD_TEST_SIGNAL_AT")
    resumed, out, _ = fit_averaged(state_path=state, state_extra={"stage": "train-teacher"})
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, untouched.state_dict()[k])
    assert out["history"] == ref["history"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_loss_of_any_kind_stops_the_run_as_diverged(bad):
    from kd_cli.train import Diverged

    x, y = toy(70)
    with pytest.raises(Diverged, match="diverged at epoch 1"):
        train(MLP(hidden=[8]), x, y, lambda z, t, _: z.sum() * 0 + bad, Recipe(epochs=2, batch_size=32, lr=0.1))


def test_a_student_with_nan_outputs_stops_a_soft_targets_only_run_as_diverged():
    # alpha=0: no labels, so the NaN can only reach the check through the soft term
    from kd_cli.losses import distillation_loss, soft_targets
    from kd_cli.train import Diverged

    model = MLP(hidden=[8])
    with torch.no_grad():
        model.out.bias[0] = float("nan")
    with pytest.raises(Diverged, match="diverged at epoch 1"):
        train(model, torch.rand(64, 28, 28), None, lambda z, y, t: distillation_loss(z, y, t, 2.0, 0.0),
              Recipe(epochs=1, batch_size=32, lr=0.1),
              targets=lambda idx, xb, shifts: soft_targets(torch.randn(len(idx), 10), 2.0))


def test_the_epochs_loss_is_the_mean_over_all_its_batches():
    # the k-th step's loss is k (its gradient 0): 3 batches an epoch, so epoch 1 is (0+1+2)/3, epoch 2 (3+4+5)/3
    step = iter(range(100))
    x, y = toy(70)
    out = train(MLP(hidden=[8]), x, y, lambda z, t, _: z.sum() * 0 + next(step), Recipe(epochs=2, batch_size=32, lr=0.1))
    assert [row["loss"] for row in out["history"]] == [1.0, 4.0]


def test_bf16_hands_the_loss_float32_logits_outside_autocast():
    # DESIGN: autocast for the forward; softmaxes, logs and T on float32 logits. Inside autocast a
    # loss with a matrix multiply (or any op autocast lowers) would silently run in bfloat16
    seen = []
    x, y = toy(70)
    train(MLP(hidden=[8]), x, y,
          lambda z, t, _: (seen.append((z.dtype, torch.is_autocast_enabled("cpu"))), hard_label_loss(z, t))[1],
          Recipe(epochs=1, batch_size=32, lr=0.1, precision="bf16"))
    assert seen == [(torch.float32, False)] * 3


def test_elastic_distortion_gets_each_batch_after_its_jitter(monkeypatch):
    """train() moves a batch by its codes, then distorts it (the distortion resamples, so the
    order matters): what elastic_distort is handed is the batch moved, image by image."""
    import kd_cli.train as loop

    handed, told = [], []
    monkeypatch.setattr(loop, "elastic_distort", lambda xb, scale, sigma: (handed.append(xb.clone()), xb)[1])
    x, y = toy(32)
    torch.manual_seed(1)
    train(MLP(hidden=[4]), x, y, lambda z, t, _: z.sum() * 0, Recipe(epochs=1, batch_size=16, lr=0.1),
          jitter_pixels=2, elastic=(3.0, 4.0), targets=lambda idx, xb, shifts: told.append((idx, shifts)))
    assert len(handed) == len(told) == 2
    for xb, (idx, shifts) in zip(handed, told):
        assert torch.equal(xb, torch.stack([moved(x[i], int(k)) for i, k in zip(idx, shifts)]))


def test_elastic_distortion_refuses_targets_cached_for_undistorted_images():
    class Cached:  # as SoftTargets when it holds the teacher's outputs on the undistorted set
        per_batch = False

        def __call__(self, idx, xb, shifts):
            return None
    x, y = toy(32)
    with pytest.raises(ValueError, match="per_batch"):
        train(MLP(hidden=[4]), x, y, lambda z, t, _: hard_label_loss(z, t), Recipe(epochs=1, batch_size=16, lr=0.1),
              targets=Cached(), elastic=(3.0, 4.0))


def test_each_epochs_validation_count_is_of_the_validation_images_and_the_test_count_of_the_test_images():
    from kd_cli.prepare import errors_fn

    torch.manual_seed(0)
    model = MLP([8]).eval()
    test_x, val_x = torch.rand(30, 1, 28, 28), torch.rand(40, 1, 28, 28)
    with torch.no_grad():
        test_pred, val_pred = model(test_x).argmax(1), model(val_x).argmax(1)
    # labels by hand: the test set predicted right but for 3 images, the validation set for 5 only
    test_y, val_y = test_pred.clone(), (val_pred + 1) % 10
    test_y[:3], val_y[:5] = (test_pred[:3] + 1) % 10, val_pred[:5]
    row = errors_fn(test_x, test_y, (val_x, val_y), batch_size=7)(model)
    assert row == {"test_errors": 3, "val_errors": 35}
