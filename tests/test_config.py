"""Every stage's config composes from the installed package, and the presets do what they say."""
import json

import pytest
from conftest import composed
from kd_cli.cli import STAGES
from kd_cli.config import check as validate
from kd_cli.errors import KDError
from kd_cli.prepare import recipe_of
from kd_cli.train import Recipe


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_composes_and_validates(stage):
    cfg = composed(stage, "checkpoint=x.pt" if stage == "evaluate" else "seed=1")
    assert cfg.hydra.job.name == stage
    assert cfg.hydra.run.dir.startswith(f"outputs/{stage}/")
    assert cfg.hydra.sweep.dir.startswith(f"outputs/{stage}-sweep/")
    validate(stage, cfg)


def test_teacher_and_student_defaults_match_the_paper():
    t = composed("train-teacher")
    assert list(t.model.hidden) == [1200, 1200] and t.model.dropout_input == 0.2
    assert t.model.dropout_hidden == 0.5 and t.model.max_norm ** 2 == pytest.approx(15, rel=1e-3)
    assert t.data.jitter == 2
    s = composed("train-student")
    assert list(s.model.hidden) == [800, 800] and s.model.max_norm is None and s.data.jitter == 0
    d = composed("distill", "recipe=paper")  # the paper's setup
    assert d.T == 20 and d.alpha == 0.1 and d.teacher is None and d.data.jitter == 0 and d.epochs == s.epochs
    # at the student's own peak lr the T=20 soft term diverged (docs/recipe_search.md, session 5)
    assert d.lr < s.lr and composed("distill", "experiment=only78").lr == d.lr


def test_distill_default_recipe_and_overrides_win():
    d = composed("distill")  # the validation-chosen recipe: T=5 on a jittered transfer set
    assert d.T == 5 and d.data.jitter == 2 and d.epochs == 120 and d.alpha == 0.1
    s = composed("train-student")  # otherwise the student's optimizer recipe, at the paper setup's lower lr
    assert d.lr < s.lr and d.lr == composed("distill", "recipe=paper").lr and d.batch_size == s.batch_size
    assert d.optim == s.optim
    d = composed("distill", "T=20", "data.jitter=0", "epochs=7")
    assert d.T == 20 and d.data.jitter == 0 and d.epochs == 7
    assert d.data.elastic.scale == 0  # no distortion unless asked for


def test_the_elastic_recipe_is_the_default_distorted():
    d, e = composed("distill"), composed("distill", "recipe=elastic")
    assert (e.data.elastic.scale, e.data.elastic.sigma, e.epochs) == (34, 4, d.epochs)
    assert (e.T, e.alpha, e.lr, e.data.jitter, e.optim) == (d.T, d.alpha, d.lr, d.data.jitter, d.optim)
    assert composed("distill", "recipe=elastic", "data.elastic.scale=10").data.elastic.scale == 10
    validate("distill", e)  # its values pass kd's own checks


def test_transfer_presets_keep_the_papers_setup():
    for preset in ("omit3", "only78", "little_data"):
        d = composed("distill", f"experiment={preset}")
        assert d.T == 20 and d.data.jitter == 0, preset


def test_hinton2012_preset_and_overrides_win():
    cfg = composed("train-teacher", "recipe=hinton2012", "epochs=7")
    assert cfg.epochs == 7 and cfg.lr == 0.25 and cfg.batch_size == 100  # the cited 10 does not learn
    assert cfg.optim.momentum_start == 0.5 and cfg.optim.momentum == 0.99
    assert cfg.optim.momentum_ramp_epochs == 500 and cfg.optim.lr_decay == 0.998
    assert cfg.optim.lr_times_one_minus_momentum


def test_every_optim_key_reaches_the_training_recipe():
    """The config's keys as the training loop's Recipe, field by field, written out by hand: the
    cited recipe (a momentum ramp, a per-epoch decay, lr times 1 - momentum), and every other key
    overridden to a value no preset uses."""
    assert recipe_of(composed("train-teacher", "recipe=hinton2012")) == Recipe(
        epochs=3000, batch_size=100, lr=0.25, momentum=0.99, momentum_start=0.5, momentum_ramp_epochs=500,
        nesterov=False, weight_decay=0.0, schedule="exponential", warmup_epochs=0, lr_decay=0.998,
        lr_times_one_minus_momentum=True, clip_grad_norm=None, precision="auto", sgd_update="fused",
        average_last_epochs=0)
    cfg = composed("train-student", "epochs=7", "batch_size=33", "lr=0.07", "optim.momentum=0.8",
                   "optim.momentum_start=0.6", "optim.momentum_ramp_epochs=3", "optim.nesterov=false",
                   "optim.weight_decay=0.001", "optim.schedule=cosine", "optim.warmup_epochs=1.5",
                   "optim.lr_decay=0.9", "optim.lr_times_one_minus_momentum=true", "optim.clip_grad_norm=5",
                   "precision=bf16", "sgd_update=foreach", "optim.average_last_epochs=4")
    assert recipe_of(cfg) == Recipe(
        epochs=7, batch_size=33, lr=0.07, momentum=0.8, momentum_start=0.6, momentum_ramp_epochs=3,
        nesterov=False, weight_decay=0.001, schedule="cosine", warmup_epochs=1.5, lr_decay=0.9,
        lr_times_one_minus_momentum=True, clip_grad_norm=5.0, precision="bf16", sgd_update="foreach",
        average_last_epochs=4)


def test_data_root_follows_kd_data_root(monkeypatch):
    monkeypatch.setenv("KD_DATA_ROOT", "/some/where")
    assert composed("distill").data.root == "/some/where"
    monkeypatch.delenv("KD_DATA_ROOT")
    assert composed("distill").data.root == "data"


def test_T_has_one_default_per_distill_recipe():
    """Each distill recipe sets its own T and nothing else shadows it: a recipe without one (the
    hard-label student's) is refused instead of running at a T from some other file."""
    assert composed("distill").T == 5 and composed("distill", "recipe=paper").T == 20
    assert composed("distill", "recipe=paper", "T=3").T == 3
    with pytest.raises(KDError, match="T has no value: recipe=student"):
        validate("distill", composed("distill", "recipe=student"))


@pytest.mark.parametrize("stage, recipe", [("train-student", "student"), ("train-teacher", "teacher"),
                                           ("train-teacher", "hinton2012"), ("distill", "distill"),
                                           ("distill", "paper"), ("distill", "elastic")])
def test_every_recipe_sets_every_optim_key_the_schema_knows(stage, recipe):
    """conf/recipe/ writes its optim: block out in three files: a key added to the schema and to one
    of them would be an unknown key for the stages of the others."""
    from kd_cli.config import SCHEMA

    optim = composed(stage, f"recipe={recipe}").optim
    assert sorted(f"optim.{k}" for k in optim) == sorted(k for k in SCHEMA if k.startswith("optim."))


def test_every_loss_kd_lists_trains_a_student(kd):
    """config.LOSSES is the list a user picks from: each must run end to end, not only pass the schema."""
    from kd_cli.config import LOSSES

    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={kd.cwd / 't'}")
    for loss in LOSSES:
        kd("distill", f"teacher={kd.cwd / 't' / 'checkpoint.pt'}", f"loss={loss}", "model.hidden=[16]", "epochs=1",
           f"hydra.run.dir={kd.cwd / loss}")
        m = json.loads((kd.cwd / loss / "metrics.json").read_text())
        assert m["loss"] == loss and 0 <= m["test_errors"] <= m["test_total"]
