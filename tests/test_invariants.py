"""The invariants of the method, checked on whole runs against a second, plain implementation:
what the teacher does when it makes targets, what reaches the loss, what the model trains and
is evaluated on. Every module forward is watched through torch's global forward hook, so these
tests hold whatever kd's own functions are called."""
import hashlib
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from kd_cli import losses
from kd_cli.checkpoint import load_checkpoint, save_checkpoint
from kd_cli.data import load_data
from kd_cli.errors import KDError
from kd_cli.models import MLP
from kd_cli.prepare import native_bf16
from kd_cli.stages import fit_bias_split

from conftest import plain_logits, run_in_process

STUDENT, TEACHER = 16, 24  # hidden widths: a forward is the student's or the teacher's by its width


@pytest.fixture
def forwards():
    """Every MLP forward of the run: (width, training, grad enabled, input)."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, MLP):
            seen.append((module.arch["hidden"][0], module.training, torch.is_grad_enabled(), args[0].detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.fixture
def soft_targets_seen(monkeypatch):
    """(log p, T) of every soft loss computed: what the student was asked to match."""
    seen = []
    real = losses.soft_loss

    def spy(z, log_p, T):
        seen.append((log_p.detach().clone(), T))
        return real(z, log_p, T)

    monkeypatch.setattr(losses, "soft_loss", spy)
    return seen


def teacher(kd, name, *args):
    kd("train-teacher", f"model.hidden=[{TEACHER}]", "epochs=2", *args, f"hydra.run.dir={kd.cwd / name}")
    return kd.cwd / name / "checkpoint.pt"


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, tiny_root):
    """Two small teachers (seeds 0 and 1), trained once for the tests that only read them."""
    cwd = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (0, 1):
        proc = run_in_process(["train-teacher", f"model.hidden=[{TEACHER}]", "epochs=2", f"seed={seed}",
                               f"hydra.run.dir={cwd / str(seed)}"], cwd, {"KD_DATA_ROOT": str(tiny_root)})
        assert proc.returncode == 0, proc.stderr
        paths.append(cwd / str(seed) / "checkpoint.pt")
    return paths


def combined(log_ps, how):
    """The ensemble's log-probabilities, by the formulas: log of the mean probability, or the
    normalised product (mean log-probability)."""
    p = torch.stack(log_ps).exp()
    if how == "arithmetic":
        return p.mean(0).log()
    g = p.log().mean(0).exp()
    return (g / g.sum(1, keepdim=True)).log()


# the three ways targets are made: cached over the set, per jittered batch (a run shorter than the
# shifts), cached over every shifted copy (1 px: 9 copies, so a run of 9 epochs caches them)
@pytest.mark.parametrize("jitter,epochs", [(0, 2), (2, 2), (1, 9)])
@pytest.mark.parametrize("how", ["one", "arithmetic", "geometric"])
def test_the_student_matches_the_eval_mode_teacher_on_its_own_batch_at_T(kd, two_teachers, forwards,
                                                                         soft_targets_seen, jitter, epochs, how):
    paths = two_teachers[:1 if how == "one" else 2]
    T = 3.0
    arg = f"teacher={paths[0]}" if how == "one" else f"teacher=[{paths[0]},{paths[1]}]"
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    kd("distill", arg, f"teacher_combine={'arithmetic' if how == 'one' else how}", f"T={T}", f"data.jitter={jitter}",
       f"model.hidden=[{STUDENT}]", f"epochs={epochs}", "batch_size=100", "alpha=0.5", f"hydra.run.dir={kd.cwd / 'd'}")
    teacher_calls = [f for f in forwards if f[0] == TEACHER]
    assert teacher_calls and all(not training and not grad for _, training, grad, _ in teacher_calls)
    student_steps = [x for width, training, _, x in forwards if width == STUDENT and training]
    assert len(student_steps) == len(soft_targets_seen) == epochs * 6  # 600 images, batch 100
    assert (len(teacher_calls) > len(paths) * epochs) == (jitter == 2)  # only per batch runs them each step
    for xb, (log_p, t) in zip(student_steps, soft_targets_seen):
        assert t == T
        want = [torch.log_softmax(plain_logits(p, xb) / T, 1) for p in paths]
        want = want[0] if how == "one" else combined(want, how)
        torch.testing.assert_close(log_p.double(), want, atol=1e-4, rtol=1e-4)
    if how == "arithmetic":  # the two combinations differ here, so using the other one would show
        other = combined([torch.log_softmax(plain_logits(p, student_steps[0]) / T, 1) for p in paths], "geometric")
        assert (other - soft_targets_seen[0][0].double()).abs().max() > 1e-3
    # nothing flowed back into a teacher's file: byte for byte what it was before the run
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] == digests


def test_under_bf16_the_teacher_still_gives_float32_soft_targets_on_each_batch(kd, two_teachers, forwards,
                                                                             soft_targets_seen):
    """precision=bf16 puts the student's forward under autocast, not the teacher's: run on each
    jittered batch (a run shorter than its shifts), the teacher's soft targets are float32 and
    match a float64 forward to 1e-4, where bfloat16's rounding is off by about 1e-2."""
    T = 3.0
    kd("distill", f"teacher={two_teachers[0]}", f"T={T}", "data.jitter=2", "precision=bf16", f"model.hidden=[{STUDENT}]",
       "epochs=2", "batch_size=100", f"hydra.run.dir={kd.cwd / 'd'}")
    student_steps = [x for width, training, _, x in forwards if width == STUDENT and training]
    assert len(student_steps) == len(soft_targets_seen) == 12
    for xb, (log_p, _) in zip(student_steps, soft_targets_seen):
        assert log_p.dtype == torch.float32
        want = torch.log_softmax(plain_logits(two_teachers[0], xb) / T, 1)
        torch.testing.assert_close(log_p.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("epochs", [2, 9])  # 9 epochs at 1 px would cache the 9 shifted copies without elastic
def test_an_elastic_transfer_set_gets_the_teachers_targets_on_each_distorted_batch(kd, two_teachers, forwards,
                                                                                  soft_targets_seen, epochs):
    """data.elastic distorts every batch anew: no copy of the set can be cached, so the teacher
    runs on each batch exactly as the student sees it, and the student sees it distorted (MNIST's
    pixels are k / 255; bilinear resampling puts most of a distorted image in between)."""
    T = 3.0
    kd("distill", f"teacher={two_teachers[0]}", f"T={T}", "data.jitter=1", "data.elastic.scale=3",
       f"model.hidden=[{STUDENT}]", f"epochs={epochs}", "batch_size=100", f"hydra.run.dir={kd.cwd / 'd'}")
    student_steps = [x for width, training, _, x in forwards if width == STUDENT and training]
    teacher_inputs = [x for width, training, grad, x in forwards if width == TEACHER and not grad]
    assert len(student_steps) == len(soft_targets_seen) == len(teacher_inputs) == epochs * 6
    for xb, tx, (log_p, _) in zip(student_steps, teacher_inputs, soft_targets_seen):
        assert torch.equal(xb, tx)
        assert ((xb * 255 - (xb * 255).round()).abs() > 1e-3).float().mean() > 0.05
        torch.testing.assert_close(log_p.double(), torch.log_softmax(plain_logits(two_teachers[0], xb) / T, 1),
                                   atol=1e-4, rtol=1e-4)


# one teacher per batch and cached over the shifted copies; an ensemble: the teachers' mean logit
@pytest.mark.parametrize("jitter,epochs,members", [(2, 2, 1), (1, 9, 1), (0, 1, 2)])
def test_logit_matching_matches_the_eval_mode_teachers_logits_on_its_own_batch(kd, two_teachers, forwards,
                                                                             monkeypatch, jitter, epochs, members):
    from kd_cli import stages

    teachers = two_teachers[:members]
    seen, real = [], stages.logit_matching_loss
    monkeypatch.setattr(stages, "logit_matching_loss", lambda z, y, v, a: (seen.append(v.clone()), real(z, y, v, a))[1])
    teacher = teachers[0] if members == 1 else f"[{','.join(map(str, teachers))}]"
    kd("distill", f"teacher={teacher}", "loss=logit_mse", f"data.jitter={jitter}",
       f"epochs={epochs}", f"model.hidden=[{STUDENT}]", "batch_size=100", f"hydra.run.dir={kd.cwd / 'd'}")
    student_steps = [x for width, training, _, x in forwards if width == STUDENT and training]
    assert len(student_steps) == len(seen) == epochs * 6
    for xb, v in zip(student_steps, seen):
        mean = sum(plain_logits(t, xb) for t in teachers) / len(teachers)
        torch.testing.assert_close(v.double(), mean, atol=1e-4, rtol=1e-4)


def member(path, seed, scale):
    """A random 784-16-10 checkpoint whose logits are scaled: confident members make the
    arithmetic and geometric combinations disagree."""
    torch.manual_seed(seed)
    m = MLP(hidden=[STUDENT])
    with torch.no_grad():
        m.out.weight.mul_(scale)
    save_checkpoint(path, {"stage": "train-teacher", "arch": m.arch, "state_dict": m.state_dict(),
                           "config": {"data": {"name": "mnist"}}, "metrics": {}})
    return path


def test_evaluate_reports_the_combination_it_was_asked_for(kd):
    paths = [member(kd.cwd / f"m{i}.pt", i, scale) for i, scale in enumerate((1, 40, 3))]
    _, _, test_x, test_y = load_data(kd.root)
    log_ps = [torch.log_softmax(plain_logits(p, test_x), 1) for p in paths]
    want = {how: int((combined(log_ps, how).argmax(1) != test_y).sum()) for how in ("arithmetic", "geometric")}
    assert want["arithmetic"] != want["geometric"]  # else the test could not tell them apart
    for how in want:
        kd("evaluate", f"checkpoint=[{','.join(map(str, paths))}]", f"combine={how}", f"hydra.run.dir={kd.cwd / how}")
        m = json.loads((kd.cwd / how / "metrics.json").read_text())
        assert m["test_errors"] == want[how] and m["ensemble_test_errors"] == want
        assert [x["test_errors"] for x in m["members"]] == [int((v.argmax(1) != test_y).sum()) for v in log_ps]
    # probabilities are combined, not logits: +30 on every output of one member changes nothing
    ck = load_checkpoint(paths[0])
    ck["state_dict"]["out.bias"] += 30.0
    save_checkpoint(kd.cwd / "m0_up.pt", {k: v for k, v in ck.items() if k != "format_version"})
    for how in want:
        kd("evaluate", f"checkpoint=[{kd.cwd / 'm0_up.pt'},{paths[1]},{paths[2]}]", f"combine={how}",
           f"hydra.run.dir={kd.cwd / (how + '_up')}")
        assert json.loads((kd.cwd / (how + "_up") / "metrics.json").read_text())["ensemble_test_errors"] == want


def test_evaluation_is_the_eval_mode_model_and_deterministic(kd, two_teachers, forwards):
    path = two_teachers[0]  # dropout 0.2 / 0.5: evaluating in train mode would change the answer
    for name in ("e1", "e2"):
        kd("evaluate", f"checkpoint={path}", f"hydra.run.dir={kd.cwd / name}")
    assert forwards and all(not training for _, training, _, _ in forwards)
    _, _, test_x, test_y = load_data(kd.root)
    logits = plain_logits(path, test_x)
    for name in ("e1", "e2"):
        m = json.loads((kd.cwd / name / "metrics.json").read_text())
        assert m["test_errors"] == int((logits.argmax(1) != test_y).sum())
        assert m["per_class_errors"] == torch.bincount(test_y[logits.argmax(1) != test_y], minlength=10).tolist()
    # and the run's own count came from the eval-mode model too
    assert json.loads((path.parent / "metrics.json").read_text())["test_errors"] == m["test_errors"]
    # as did every per-epoch count of a run: every forward outside autograd is in eval mode, and
    # every one inside it in training mode (a dropout teacher, watched while it trains)
    forwards.clear()
    teacher(kd, "watched")
    evaluations = [training for _, training, grad, _ in forwards if not grad]
    assert len(evaluations) >= 3 and not any(evaluations)  # before training and after each of 2 epochs
    assert all(training for _, training, grad, _ in forwards if grad)


def rows(x):
    """Each image as bytes, in order: an image is recognised by its pixels."""
    return [r.numpy().tobytes() for r in x.flatten(1)]


def test_a_validation_split_never_overlaps_the_images_trained_on(kd, forwards):
    train_x, _, _, _ = load_data(kd.root)
    kd("train-student", f"model.hidden=[{STUDENT}]", "epochs=2", "data.val_size=150", "data.transfer.exclude=[3]",
       f"hydra.run.dir={kd.cwd / 's'}")
    trained = set().union(*(rows(x) for w, training, _, x in forwards if training))
    evaluated = set().union(*(rows(x) for w, training, _, x in forwards if not training))
    held_out = evaluated & set(rows(train_x))  # evaluated images that come from the training file
    assert len(held_out) == 150 and not held_out & trained
    assert len(trained) == json.loads((kd.cwd / "s" / "metrics.json").read_text())["transfer"]["size"]
    forwards.clear()
    kd("evaluate", f"checkpoint={kd.cwd / 's' / 'checkpoint.pt'}", "fit_bias=[3]", f"hydra.run.dir={kd.cwd / 'e'}")
    fitted_on = set().union(*(rows(x) for _, _, _, x in forwards)) & set(rows(train_x))
    assert len(fitted_on) == 150 and not fitted_on & trained
    assert fitted_on == held_out


def trained_and_held_out(forwards, train_x):
    """The images a run trained on, and the training-file images it only evaluated (its split)."""
    trained = set().union(*(rows(x) for _, training, _, x in forwards if training))
    evaluated = set().union(*(rows(x) for _, training, _, x in forwards if not training))
    return trained, evaluated & set(rows(train_x))


def test_the_validation_split_is_the_same_images_whatever_the_runs_seed(kd, forwards):
    # fit_bias re-cuts the split a checkpoint's run held out: it must not depend on the run's seed
    train_x, _, _, _ = load_data(kd.root)
    held = []
    for seed in (0, 1):
        forwards.clear()
        kd("train-student", f"model.hidden=[{STUDENT}]", "epochs=1", "data.val_size=150", f"seed={seed}",
           f"hydra.run.dir={kd.cwd / str(seed)}")
        trained, held_out = trained_and_held_out(forwards, train_x)
        assert len(held_out) == 150 and not held_out & trained
        held.append(held_out)
    assert held[0] == held[1]
    forwards.clear()
    kd("evaluate", f"checkpoint={kd.cwd / '1' / 'checkpoint.pt'}", "fit_bias=[3]", f"hydra.run.dir={kd.cwd / 'e'}")
    assert set().union(*(rows(x) for _, _, _, x in forwards)) & set(rows(train_x)) == held[1]


def test_fit_bias_after_a_train_limit_run_fits_on_that_runs_split_and_says_when_it_cannot(kd, forwards):
    train_x, _, _, _ = load_data(kd.root)
    kd("train-student", f"model.hidden=[{STUDENT}]", "epochs=1", "data.train_limit=400", "data.val_size=100",
       f"hydra.run.dir={kd.cwd / 's'}")
    trained, held_out = trained_and_held_out(forwards, train_x)
    ckpt = kd.cwd / "s" / "checkpoint.pt"
    forwards.clear()
    proc = kd("evaluate", f"checkpoint={ckpt}", "fit_bias=[3]", f"hydra.run.dir={kd.cwd / 'e'}")
    fitted_on = set().union(*(rows(x) for _, _, _, x in forwards)) & set(rows(train_x))
    assert fitted_on == held_out and not fitted_on & trained
    assert "(fitted on the validation split)" in proc.stdout, proc.stdout
    assert json.loads((kd.cwd / "e" / "metrics.json").read_text())["bias"]["val_held_out_from_training"] is True
    # another train_limit or val_size would cut the split elsewhere, among images the run trained on
    for other in ("data.train_limit=500", "data.val_size=200"):
        proc = kd("evaluate", f"checkpoint={ckpt}", "fit_bias=[3]", other, f"hydra.run.dir={kd.cwd / 'e2'}", check=False)
        assert proc.returncode == 2 and "held out its validation split with" in proc.stderr, proc.stderr
        assert not (kd.cwd / "e2").exists()
    # the same cut of other files (here one training label changed) is not the split it held out
    other = kd.cwd / "other"
    shutil.copytree(kd.root, other)
    labels = other / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8] = (raw[8] + 1) % 10  # the first image's label, after the 8-byte idx header
    labels.write_bytes(bytes(raw))
    proc = kd("evaluate", f"checkpoint={ckpt}", "fit_bias=[3]", f"data.root={other}", f"hydra.run.dir={kd.cwd / 'e2'}",
              check=False)
    assert proc.returncode == 2 and "held out its validation split from other mnist training files" in proc.stderr, proc.stderr
    assert not (kd.cwd / "e2").exists()
    with pytest.raises(KDError, match="from other mnist training files"):  # the stage checks as it loads, too
        fit_bias_split(OmegaConf.create({"data": {"val_size": 0, "train_limit": None, "root": str(other),
                                                  "name": "mnist"}}), load_checkpoint(ckpt))
    # a run that held out none: a split given here is cut from images it trained on, and it says so
    kd("train-student", f"model.hidden=[{STUDENT}]", "epochs=1", "data.train_limit=400", f"hydra.run.dir={kd.cwd / 'n'}")
    forwards.clear()
    proc = kd("evaluate", f"checkpoint={kd.cwd / 'n' / 'checkpoint.pt'}", "fit_bias=[3]", "data.val_size=100",
              f"hydra.run.dir={kd.cwd / 'e3'}")
    fitted_on = set().union(*(rows(x) for _, _, _, x in forwards)) & set(rows(train_x))
    assert fitted_on and fitted_on <= set(rows(train_x[:400]))  # what the flag and the line must not hide
    assert json.loads((kd.cwd / "e3" / "metrics.json").read_text())["bias"]["val_held_out_from_training"] is False
    assert "(fitted on training images the model trained on" in proc.stdout, proc.stdout


def test_a_fraction_of_the_transfer_set_reaches_the_run_stratified_and_fixed_by_its_own_seed(kd, forwards):
    train_x, train_y, _, _ = load_data(kd.root)
    label_of = dict(zip(rows(train_x), train_y.tolist()))
    want = [round(0.1 * int((train_y == c).sum())) for c in range(10)]  # by hand: 10% of each digit
    sets = {}
    for name, args in (("a", ["seed=0"]), ("b", ["seed=1"]), ("c", ["seed=0", "data.transfer.seed=1"])):
        forwards.clear()
        kd("train-student", f"model.hidden=[{STUDENT}]", "epochs=1", "data.transfer.fraction=0.1", *args,
           f"hydra.run.dir={kd.cwd / name}")
        sets[name], _ = trained_and_held_out(forwards, train_x)
        per_class = torch.bincount(torch.tensor([label_of[r] for r in sets[name]]), minlength=10).tolist()
        assert per_class == want
        assert json.loads((kd.cwd / name / "metrics.json").read_text())["train_images"] == sum(want)
    assert sets["a"] == sets["b"] and sets["a"] != sets["c"]


def test_configured_max_norm_reaches_the_loop(kd):
    kd("train-teacher", f"model.hidden=[{TEACHER}]", "epochs=2", "model.max_norm=0.5", "lr=1.0",
       f"hydra.run.dir={kd.cwd / 't'}")
    w = load_checkpoint(kd.cwd / "t" / "checkpoint.pt")["state_dict"]
    norms = torch.cat([w[k].norm(dim=1) for k in w if k.startswith("hidden.") and k.endswith("weight")])
    assert norms.max() <= 0.5 * (1 + 1e-5) and norms.max() >= 0.5 * (1 - 1e-3)  # held, and it bound


def test_the_teachers_jitter_reaches_the_loop(kd, forwards):
    """Each training image is seen once an epoch, shifted by its own amount within +-2 px (the
    teacher's default), with shifts of 2 among them."""
    train_x, _, _, _ = load_data(kd.root)
    padded = torch.nn.functional.pad(train_x, (2, 2, 2, 2))
    where = {}
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = padded[:, 2 - dy:30 - dy, 2 - dx:30 - dx]
            where.update({r: (i, dy, dx) for i, r in enumerate(rows(shifted))})
    kd("train-teacher", f"model.hidden=[{TEACHER}]", "epochs=1", f"hydra.run.dir={kd.cwd / 't'}")
    seen = [where.get(r) for x in (x for _, training, _, x in forwards if training) for r in rows(x)]
    assert None not in seen and sorted(i for i, _, _ in seen) == list(range(600))
    assert max(max(abs(dy), abs(dx)) for _, dy, dx in seen) == 2
    assert sum((dy, dx) == (0, 0) for _, dy, dx in seen) < 600 / 10  # about 1 in 25 is unshifted


def history_and_final(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    return [h["test_errors"] for h in m["history"]], m["test_errors"]


@pytest.mark.parametrize("stage", ["train-teacher", "train-student", "distill"])
def test_every_training_stage_learns(kd, stage):
    """On the synthetic digits (chance: 180 of 200 wrong) each stage ends far below chance and far
    below its untrained start (history's epoch 0)."""
    extra = []
    if stage == "distill":
        extra = [f"teacher={teacher(kd, 't', 'epochs=5', 'batch_size=50')}"]
    kd(stage, f"model.hidden=[{STUDENT}]", "epochs=5", "batch_size=50", *extra, f"hydra.run.dir={kd.cwd / 'r'}")
    history, final = history_and_final(kd.cwd / "r")
    assert history[0] > 120 and final <= 10 and final == history[-1]


def test_specialists_improve_on_a_weak_generalist(kd):
    """Specialists fine-tuned from a barely trained generalist: the combined model must beat the
    generalist alone by far, and the generalist's own count must be the checkpoint's."""
    weak = teacher(kd, "g", "epochs=1", "lr=0.01")
    kd("train-specialists", f"generalist={weak}", "epochs=5", "lr=0.1", "clusters=3", f"hydra.run.dir={kd.cwd / 's'}")
    m = json.loads((kd.cwd / "s" / "metrics.json").read_text())
    _, _, test_x, test_y = load_data(kd.root)
    assert m["generalist_test_errors"] == int((plain_logits(weak, test_x).argmax(1) != test_y).sum())
    assert m["generalist_test_errors"] > 120 and m["test_errors"] < m["generalist_test_errors"] / 2
    assert m["errors_where_active"]["combined"] < m["errors_where_active"]["generalist"]


def test_bf16_runs_the_forward_in_bfloat16_keeps_float32_and_learns(kd):
    """precision=bf16: the training forward's matrix multiplies in bfloat16; weights, checkpoint
    and evaluation in float32; the same seed gives the same weights; and it still learns."""
    linear_out = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear):
            linear_out.append((module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        for name in ("a", "b"):
            proc = kd("train-teacher", f"model.hidden=[{TEACHER}]", "epochs=5", "batch_size=50", "precision=bf16",
                      f"hydra.run.dir={kd.cwd / name}")
            assert ("kd: warning: precision=bf16" in proc.stderr) != native_bf16(torch.device("cpu"))
    finally:
        handle.remove()
    assert {dtype for training, dtype in linear_out if training} == {torch.bfloat16}
    assert {dtype for training, dtype in linear_out if not training} == {torch.float32}
    wa, wb = (load_checkpoint(kd.cwd / n / "checkpoint.pt")["state_dict"] for n in ("a", "b"))
    assert all(v.dtype == torch.float32 for v in wa.values()) and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    history, final = history_and_final(kd.cwd / "a")
    assert history[0] > 120 and final <= 10
    assert json.loads((kd.cwd / "a" / "metrics.json").read_text())["precision"] == "bf16"
