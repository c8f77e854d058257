"""Specialists: clustering confusable classes, the data mix and dustbin correction, the KL
combination (checked against a brute-force search), and the stage end to end."""
import itertools
import json
import math

import pytest
import torch

from kd_cli import specialists as sp, stages
from kd_cli.checkpoint import load_checkpoint
from kd_cli.models import MLP
from kd_cli.train import Recipe
from kd_cli.specialists import (active_specialists, combine, covariance_clusters, kl_objective,
                                specialist_data, specialist_head, specialist_log_q, train_specialist)


def test_classes_that_rise_and_fall_together_share_a_cluster():
    g = torch.Generator().manual_seed(0)
    a, b, noise = torch.randn(500, generator=g), torch.randn(500, generator=g), torch.randn(500, 4, generator=g)
    # classes 0 and 2 move together, and 1 and 3: two confusable pairs
    predictions = torch.stack([a, b, a, b], 1) * 3 + 0.3 * noise
    assert covariance_clusters(predictions, 2) == [[0, 2], [1, 3]]
    assert covariance_clusters(predictions, 4) == [[0], [1], [2], [3]]


def test_specialist_data_is_half_subset_half_dustbin_and_the_shift_restores_the_odds():
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 150 + [3] * 100)
    x = torch.arange(300.).view(300, 1, 1)
    xs, ys, shift = specialist_data(x, y, [1, 0], seed=0)
    assert ys.tolist().count(0) == 30 and ys.tolist().count(1) == 20 and ys.tolist().count(2) == 50
    assert set(y[xs[ys == 2][:, 0, 0].long()].tolist()) == {2, 3}  # a sample of all the others
    xs1, _, _ = specialist_data(x, y, [1, 0], seed=1)
    assert not torch.equal(xs, xs1)  # which others: a seeded random pick, not the first ones
    # a model that only knows the mix's class frequencies, corrected, gives the true ones back
    mix = torch.bincount(ys, minlength=3).float() / ys.numel()
    logits = mix.log()
    logits[2] += shift
    torch.testing.assert_close(torch.softmax(logits, 0)[2], torch.tensor(250 / 300))


def test_the_head_starts_where_the_generalist_is_on_its_classes():
    torch.manual_seed(0)
    gen = MLP(hidden=[8]).eval()
    spec = MLP(hidden=[8], out_features=4).eval()
    spec.hidden.load_state_dict(gen.hidden.state_dict())
    with torch.no_grad():
        spec.out.weight[:], spec.out.bias[:] = specialist_head(gen.out, [4, 9, 2])
    x = torch.rand(5, 28, 28)
    torch.testing.assert_close(spec(x)[:, :3], gen(x)[:, [4, 9, 2]])


def test_the_dustbin_starts_as_the_total_of_the_classes_it_stands_for():
    """Where the generalist gives every class outside S the same logit l, the dustbin's is
    log(sum of their exps) = l + log(how many): the head starts out agreeing with the generalist."""
    torch.manual_seed(0)
    gen = MLP(hidden=[8]).eval()
    others = [c for c in range(10) if c not in (4, 9, 2)]
    with torch.no_grad():
        gen.out.weight[others], gen.out.bias[others] = gen.out.weight[0].clone(), gen.out.bias[0].clone()
    weight, bias = specialist_head(gen.out, [4, 9, 2])
    h = torch.relu(gen.hidden[0](torch.rand(5, 784)))
    torch.testing.assert_close(h @ weight[-1] + bias[-1], gen.out(h)[:, 0] + math.log(len(others)))


def test_a_trained_specialist_gets_the_dustbin_correction_added():
    """Zero epochs: the specialist is its initial head plus the correction log(rest / taken) on the
    dustbin bias (20 images of S, 80 others, 20 of them taken: log 4), nothing else moved."""
    torch.manual_seed(0)
    gen = MLP(hidden=[8]).eval()
    y = torch.tensor([0] * 10 + [1] * 10 + [5] * 40 + [7] * 40)
    x = torch.rand(100, 28, 28)
    model, record = train_specialist(gen, [0, 1], x, y, Recipe(epochs=0, batch_size=10, lr=0.1))
    _, bias = specialist_head(gen.out, [0, 1])
    assert record["dustbin_shift"] == round(math.log(4), 6)
    torch.testing.assert_close(model.out.bias[:2], bias[:2])
    torch.testing.assert_close(model.out.bias[-1], bias[-1] + math.log(4))
    # and the whole model starts from the generalist: its hidden layers and its head's weights, so
    # on S it gives the generalist's logits, and its dustbin the head's plus the correction
    weight, _ = specialist_head(gen.out, [0, 1])
    torch.testing.assert_close(model.out.weight, weight)
    with torch.no_grad():
        logits, general = model(x), gen(x)
        h = torch.relu(gen.hidden[0](x.flatten(1)))
    torch.testing.assert_close(logits[:, :2], general[:, [0, 1]])
    torch.testing.assert_close(logits[:, -1], h @ weight[-1] + bias[-1] + math.log(4))


def test_the_combination_objective_is_the_generalist_kl_plus_each_active_specialists():
    """By hand for one case of 3 classes and one specialist for [0, 1] (outputs 0, 1, dustbin):
    KL(p_g || q) + KL(p_m || (q0, q1, q2)), and KL(p_g || q) alone when it is not active."""
    p_g, p_m, q = [0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.5, 0.25, 0.25]
    def kl(p, r):
        return sum(a * math.log(a / b) for a, b in zip(p, r))
    view = [q[0], q[1], q[2]]  # the dustbin holds what is not 0 or 1: here class 2 alone
    args = (torch.tensor([q], dtype=torch.float64).log(), torch.tensor([p_g], dtype=torch.float64),
            [torch.tensor([p_m], dtype=torch.float64)], [[0, 1]])
    on = kl_objective(*args, torch.tensor([[True]]))
    off = kl_objective(*args, torch.tensor([[False]]))
    assert float(on) == pytest.approx(kl(p_g, q) + kl(p_m, view), rel=1e-12)
    assert float(off) == pytest.approx(kl(p_g, q), rel=1e-12)


def test_active_specialists_meet_the_top_classes():
    p = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.05, 0.05, 0.3, 0.6]])
    active = active_specialists(p, [[1, 2], [3]], top_n=2)
    assert active.tolist() == [[True, False], [True, True]]
    assert active_specialists(p, [[1, 2], [3]], top_n=1).tolist() == [[False, False], [False, True]]


def test_the_combination_is_the_distribution_that_minimises_the_summed_kls():
    g = torch.Generator().manual_seed(1)
    p_g = torch.softmax(torch.randn(3, 4, generator=g) * 2, 1).double()
    subsets = [[0, 1], [1, 2]]
    p_m = [torch.softmax(torch.randn(3, 3, generator=g) * 2, 1).double() for _ in subsets]
    active = torch.tensor([[True, True], [True, False], [False, False]])
    q = combine(p_g, p_m, subsets, active)
    torch.testing.assert_close(q.sum(1), torch.ones(3, dtype=q.dtype))
    torch.testing.assert_close(q[2], p_g[2])  # no active specialist: the generalist's own
    # brute force over the simplex (step 0.01) finds nothing better
    grid = torch.tensor([(a, b, c, 100 - a - b - c) for a, b, c in itertools.product(range(1, 100), repeat=3)
                         if a + b + c < 100], dtype=torch.float64) / 100
    for case in range(2):
        def objective(qs):
            n = qs.shape[0]
            return kl_objective(qs.log(), p_g[case].expand(n, 4), [p[case].expand(n, 3) for p in p_m],
                                subsets, active[case].expand(n, 2))
        best_grid = float(objective(grid).min())
        ours = float(objective(q[case:case + 1]))
        assert ours <= best_grid + 1e-9
    # specialist m's view of q: its classes, then the dustbin holding the rest
    log_view = specialist_log_q(q.log(), [1, 2])
    torch.testing.assert_close(log_view.exp()[:, 2], q[:, [0, 3]].sum(1))


def test_the_configured_jitter_and_recipe_reach_each_specialists_training(kd, monkeypatch):
    import kd_cli.specialists as specialists

    kd("train-teacher", "model.hidden=[32]", "epochs=1", f"hydra.run.dir={kd.cwd / 'g'}")
    seen = []
    real = specialists.train
    monkeypatch.setattr(specialists, "train", lambda *a, **kw: seen.append((a[4].epochs, kw)) or real(*a, **kw))
    kd("train-specialists", f"generalist={kd.cwd / 'g' / 'checkpoint.pt'}", "clusters=3", "epochs=1",
       "data.jitter=1", f"hydra.run.dir={kd.cwd / 's'}")
    assert seen and all(epochs == 1 and kw["jitter_pixels"] == 1 for epochs, kw in seen), seen


def test_train_specialists_end_to_end(kd, monkeypatch):
    kd("train-teacher", "model.hidden=[32]", "epochs=2", f"hydra.run.dir={kd.cwd / 'g'}")
    clustered = []

    def recording(predictions, *args):
        clustered.append(predictions)
        return covariance_clusters(predictions, *args)
    monkeypatch.setattr(stages, "covariance_clusters", recording)
    proc = kd("train-specialists", f"generalist={kd.cwd / 'g' / 'checkpoint.pt'}", "clusters=3", "epochs=1",
              f"hydra.run.dir={kd.cwd / 's'}")
    assert proc.stdout.strip().splitlines()[-1].startswith("test errors: ")
    m = json.loads((kd.cwd / "s" / "metrics.json").read_text())
    assert sorted(c for s in m["subsets"] for c in s) == sorted(set(c for s in m["subsets"] for c in s))
    assert all(len(s) >= 2 for s in m["subsets"]) and 0 <= m["cases_with_active_specialists"] <= 200
    assert all(math.isfinite(s["dustbin_shift"]) for s in m["specialists"])
    # the clusters come from the generalist's log-probabilities (see covariance_clusters), one row
    # per training image
    (log_p,) = clustered
    assert log_p.shape == (600, 10) and torch.all(log_p <= 0)
    torch.testing.assert_close(torch.logsumexp(log_p, 1), torch.zeros(600))
    ckpt = load_checkpoint(kd.cwd / "s" / "checkpoint.pt")
    assert [s["classes"] for s in ckpt["specialists"]] == m["subsets"]
    assert ckpt["specialists"][0]["arch"]["out_features"] == len(m["subsets"][0]) + 1
    # its weights are the generalist alone: as one model (evaluate, a teacher) it would report the
    # generalist's errors as if they were the combination's, so it is refused and the generalist named
    specialists = kd.cwd / "s" / "checkpoint.pt"
    for args in (["evaluate", f"checkpoint={specialists}"], ["distill", f"teacher={specialists}", "epochs=1"],
                 ["train-specialists", f"generalist={specialists}"]):
        proc = kd(*args, check=False)
        assert proc.returncode == 2 and "generalist with specialists" in proc.stderr
        assert str(kd.cwd / "g" / "checkpoint.pt") in proc.stderr


def test_a_folder_of_several_teachers_as_generalist_is_refused_not_cut_to_its_first(kd):
    sweep = kd.cwd / "teachers"
    kd("train-teacher", "-m", "seed=0,1", "model.hidden=[16]", "epochs=1", f"hydra.sweep.dir={sweep}")
    proc = kd("train-specialists", f"generalist={sweep}", "epochs=1", f"hydra.run.dir={kd.cwd / 's'}", check=False)
    assert proc.returncode == 2 and "names 2 checkpoints" in proc.stderr and "pass one checkpoint.pt" in proc.stderr
    assert not (kd.cwd / "s" / "metrics.json").exists()


# specialist m's KL term counts where m itself is active, by hand
def test_each_specialist_counts_only_where_it_itself_is_active():
    p_g, q = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]
    p_a, p_b = [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]  # over (0, 1, dustbin), (2, 3, dustbin)

    def kl(p, r):
        return sum(a * math.log(a / b) for a, b in zip(p, r))
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = sp.kl_objective(t(q).log(), t(p_g), [t(p_a), t(p_b)], [[0, 1], [2, 3]], torch.tensor([[False, True]]))
    want = kl(p_g, q) + kl(p_b, [q[2], q[3], q[0] + q[1]])
    assert float(got) == pytest.approx(want, rel=1e-12)


class Fixed(torch.nn.Module):
    """A "model" whose logits are given: predict_logits hands back exactly these."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


# the specialists' per-case distributions reach the combination, and the errors where one is active, by hand
def test_evaluate_combination_by_hand(monkeypatch):
    gen = Fixed(torch.tensor([[2.0, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 1, 0, 2]]))
    spec_logits = torch.tensor([[-5.0, 5, -5], [-5, 5, -5], [-4, 4, -4], [-3, 3, -3]])
    spec = Fixed(spec_logits)
    seen, real = [], sp.combine
    monkeypatch.setattr(sp, "combine", lambda p_g, p_m, *a: (seen.append(p_m), real(p_g, p_m, *a))[1])
    y = torch.tensor([1, 1, 0, 3])
    # top-1 classes 0, 1, 2, 3: the [0, 1] specialist is active on cases 0 and 1 only
    m = sp.evaluate_combination(gen, [spec], [[0, 1]], 1, torch.zeros(4, 1), y, 100)
    e = spec_logits.exp()
    torch.testing.assert_close(seen[0][0], e / e.sum(1, keepdim=True))  # per case, over its 3 outputs
    assert m["cases_with_active_specialists"] == 2
    assert m["generalist_test_errors"] == 2 and m["test_errors"] == 1  # case 0 is set right
    assert m["errors_where_active"] == {"generalist": 1, "combined": 0}


# the dustbin correction when the other classes have fewer images than the subset (all are taken)
def test_the_shift_restores_the_odds_when_all_the_others_are_taken():
    y = torch.tensor([0] * 60 + [1] * 60 + [2] * 30)
    x = torch.arange(150.).view(150, 1, 1)
    _, ys, shift = sp.specialist_data(x, y, [0, 1], seed=0)
    assert ys.numel() == 150 and shift == 0.0  # the mix is the data set: nothing to undo
    logits = (torch.bincount(ys, minlength=3).float() / ys.numel()).log()
    logits[2] += shift
    torch.testing.assert_close(torch.softmax(logits, 0)[2], torch.tensor(30 / 150))


# the dustbin's starting bias is the others' mean bias plus log(how many), by hand
def test_the_dustbin_bias_is_the_mean_of_the_others_plus_log_their_count():
    torch.manual_seed(0)
    out = torch.nn.Linear(8, 5)
    with torch.no_grad():
        out.bias[:] = torch.tensor([0.0, 1.0, 2.0, 4.0, 9.0])
    _, bias = sp.specialist_head(out, [0, 1])
    assert float(bias[-1]) == pytest.approx((2 + 4 + 9) / 3 + math.log(3), rel=1e-6)
