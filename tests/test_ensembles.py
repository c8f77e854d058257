"""Teacher ensembles (arithmetic and geometric means), logit matching, and Fashion-MNIST."""
import json
import shutil

import pytest
import torch

from kd_cli.losses import logit_mse, soft_loss, soft_targets
from kd_cli.teachers import combine_log_probs


def test_arithmetic_and_geometric_means_by_hand():
    p = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]])  # two teachers, one case, two classes
    arithmetic = combine_log_probs(p.log(), "arithmetic").exp()
    torch.testing.assert_close(arithmetic, torch.tensor([[0.7, 0.3]]))
    # geometric: sqrt(.9 * .5) = .6708, sqrt(.1 * .5) = .2236, renormalised: .75, .25
    geometric = combine_log_probs(p.log(), "geometric").exp()
    torch.testing.assert_close(geometric, torch.tensor([[0.75, 0.25]]))
    # averaging logits (log p plus any per-teacher, per-case constant) gives the geometric mean
    # computed by hand above, never the arithmetic one
    logits = p.log() + torch.tensor([[[3.0]], [[-7.0]]])
    mean_logits = torch.softmax(logits.mean(0), dim=-1)
    torch.testing.assert_close(mean_logits, torch.tensor([[0.75, 0.25]]))
    assert not torch.allclose(mean_logits, torch.tensor([[0.7, 0.3]]))


def test_combinations_are_distributions_and_one_teacher_is_itself():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(3, 50, 10, generator=g) * 4, dim=-1)
    for how in ("arithmetic", "geometric"):
        q = combine_log_probs(log_p, how).exp()
        torch.testing.assert_close(q.sum(-1), torch.ones(50))
        torch.testing.assert_close(combine_log_probs(log_p[:1], how), log_p[0])


def test_high_temperature_distillation_gradient_approaches_logit_matching():
    g = torch.Generator().manual_seed(0)
    z0, v = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    z0, v = z0 - z0.mean(1, keepdim=True), v - v.mean(1, keepdim=True)  # zero-meaned logits

    def grad(loss_fn):
        z = z0.clone().requires_grad_()
        loss_fn(z).backward()
        return z.grad

    matching = grad(lambda z: logit_mse(z, v))
    torch.testing.assert_close(matching, (z0 - v) / 10 / 8)  # (z - v) / C, batch mean
    gaps = []
    for T in (5.0, 50.0, 500.0):
        distill = grad(lambda z: T * T * soft_loss(z, soft_targets(v, T), T))
        gaps.append(float((distill - matching).abs().max() / matching.abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_distill_from_a_seed_sweep_of_teachers_and_evaluate_the_ensemble(kd):
    sweep = kd.cwd / "teachers"
    kd("train-teacher", "-m", "seed=0,1", "model.hidden=[32]", "epochs=1", f"hydra.sweep.dir={sweep}")
    ckpts = sorted(sweep.glob("*/checkpoint.pt"))
    assert len(ckpts) == 2
    for combine in ("arithmetic", "geometric"):
        run = kd.cwd / combine
        kd("distill", f"teacher={sweep}", f"teacher_combine={combine}", "model.hidden=[16]", "epochs=2",
           f"hydra.run.dir={run}")
        m = metrics(run)
        assert m["teacher_combine"] == combine and len(m["teacher"]) == 2
        assert {t["path"] for t in m["teacher"]} == {str(c.resolve()) for c in ckpts}
    # in a list, paths that hold = and , (sweep job folders) need Hydra's quotes; a single path
    # (teacher= below) is quoted by kd itself
    kd("evaluate", f"checkpoint=['{ckpts[0]}','{ckpts[1]}']", f"hydra.run.dir={kd.cwd / 'ensemble'}")
    e = metrics(kd.cwd / "ensemble")
    members = [metrics(c.parent)["test_errors"] for c in ckpts]
    assert [m["test_errors"] for m in e["members"]] == members
    assert e["test_errors"] == e["ensemble_test_errors"]["arithmetic"]
    assert set(e["ensemble_test_errors"]) == {"arithmetic", "geometric"}
    kd("distill", f"teacher={ckpts[0]}", "loss=logit_mse", "model.hidden=[16]", "epochs=2",
       f"hydra.run.dir={kd.cwd / 'matching'}")
    # a sweep with a job missing would be a smaller ensemble than asked for; a search is no ensemble
    stopped = kd.cwd / "stopped"
    kd("train-teacher", "-m", "epochs=1,2", "model.hidden=[32]", f"hydra.sweep.dir={stopped}",
       extra_env={"KD_TEST_SIGNAL_AT": "SIGINT@2:0"}, check=False)  # job 0 finishes, job 1 stops in epoch 2
    assert len(list(stopped.glob("*/checkpoint.pt"))) == 1
    search = kd.cwd / "search"
    shutil.copytree(sweep, search)
    record = search / "multirun.yaml"
    record.write_text(record.read_text().replace("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                                 "hydra_plugins.kd_search.KdSearch"))
    for folder, says in ((stopped, "1 job(s) did not finish (1_"), (search, "is a search")):
        proc = kd("distill", f"teacher={folder}", "model.hidden=[16]", "epochs=1", check=False)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    proc = kd("evaluate", f"checkpoint={search}", check=False)  # not "evaluate its trials as an ensemble"
    assert proc.returncode == 2 and "is a search: its trials are candidates; pass the chosen" in proc.stderr
    assert metrics(kd.cwd / "matching")["loss"] == "logit_mse"
    # a run's folder is its own checkpoint, not also the runs a user keeps inside it
    one = ckpts[0].parent
    kd("distill", f"teacher={one}", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={one / 'student'}")
    kd("distill", f"teacher={one}", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={kd.cwd / 'from-folder'}")
    assert metrics(kd.cwd / "from-folder")["teacher"]["path"] == str(ckpts[0].resolve())


@pytest.fixture
def fashion_root(tiny_root, tmp_path):
    """The tiny synthetic set again, laid out as torchvision's FashionMNIST (only)."""
    root = tmp_path / "fashion"
    shutil.copytree(tiny_root / "MNIST", root / "FashionMNIST")
    return root


def test_every_stage_takes_fashion_mnist_and_refuses_a_teacher_of_other_data(kd, fashion_root):
    kd("train-teacher", "data=fashion_mnist", f"data.root={fashion_root}", "model.hidden=[16]", "epochs=1",
       f"hydra.run.dir={kd.cwd / 'ft'}")
    kd("distill", "data=fashion_mnist", f"data.root={fashion_root}", f"teacher={kd.cwd / 'ft' / 'checkpoint.pt'}",
       "model.hidden=[16]", "epochs=1", f"hydra.run.dir={kd.cwd / 'fd'}")
    kd("evaluate", "data=fashion_mnist", f"data.root={fashion_root}", f"checkpoint={kd.cwd / 'fd' / 'checkpoint.pt'}")
    proc = kd("distill", f"teacher={kd.cwd / 'ft' / 'checkpoint.pt'}", "epochs=1", check=False)  # MNIST run
    assert proc.returncode == 2 and "trained on fashion_mnist" in proc.stderr
    proc = kd("train-student", "data=fashion_mnist", "data.download=false", check=False)  # tiny_root has no FashionMNIST
    assert proc.returncode == 2 and "FashionMNIST not found" in proc.stderr
