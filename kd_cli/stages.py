"""One function per stage: (cfg, out_dir) -> metrics. Reads the config, calls plain functions."""
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import cpu_weights, load_checkpoint, save_checkpoint, save_json, sha256_of
from .data import load_mnist, split_validation, transfer_set
from .errors import KDError
from .evaluate import count_errors, errors_on, fit_bias_shift, predict_logits, shift_biases
from .specialists import active_specialists, combine, covariance_clusters, specialist_data, specialist_head
from .losses import distillation_loss, logit_matching_loss, soft_targets
from .models import MLP, build_mlp
from .teachers import COMBINE, combine_log_probs, load_model, load_teacher, resolve_teacher, teacher_logits
from .train import SCHEDULES, Recipe, train

TRAINING_STAGES = ("train-teacher", "train-student", "distill")
LOSSES = ("kd", "logit_mse")  # the paper's soft-target loss at T; Caruana et al.'s logit matching
STATE_FILE = "state.pt"  # the resumable training state, in the run dir until the run finishes


# ---- checking the values a user typed, before any work ------------------------------------------

def _number(cfg, key, ok, need, kind=float):
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise KDError(f"{key} must be {need}, got {value!r}") from None
    if not ok(number):
        raise KDError(f"{key} must be {need}, got {value!r}")
    return number


def validate(stage, cfg):
    """Raise KDError naming the key and the fix for any value the stage cannot run with."""
    _number(cfg, "seed", lambda v: True, "an integer", int)
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise KDError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise KDError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if stage == "evaluate":
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise KDError("kd evaluate needs checkpoint=<path to a checkpoint.pt>")
        if cfg.get("combine", "arithmetic") not in COMBINE:
            raise KDError(f"combine must be one of {', '.join(COMBINE)}, got {cfg.combine!r}")
        _validate_bias(cfg)
    if stage == "train-specialists":
        _number(cfg, "clusters", lambda v: 1 <= v <= 10, "an integer in 1..10 (k of k-means)", int)
        _number(cfg, "top_n", lambda v: 1 <= v <= 10, "an integer in 1..10", int)
        _validate_recipe(cfg)
        return
    if stage not in TRAINING_STAGES:
        return
    hidden = cfg.model.hidden
    if not OmegaConf.is_list(hidden) or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise KDError(f"model.hidden must be a list of layer widths, e.g. model.hidden=[800,800], got {hidden!r}")
    for key in ("model.dropout_input", "model.dropout_hidden"):
        _number(cfg, key, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if cfg.model.max_norm is not None:
        _number(cfg, "model.max_norm", lambda v: v > 0, "null or a number > 0")
    _validate_recipe(cfg)
    if stage == "distill":
        _number(cfg, "T", lambda v: v > 0, "a number > 0 (the temperature), e.g. T=20")
        _number(cfg, "alpha", lambda v: 0 <= v <= 1,
                "a number in [0, 1] (the weight of the hard-label term), e.g. alpha=0.1")
        if cfg.loss not in LOSSES:
            raise KDError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
        if cfg.teacher_combine not in COMBINE:
            raise KDError(f"teacher_combine must be one of {', '.join(COMBINE)}, got {cfg.teacher_combine!r}")


def _validate_recipe(cfg):
    """The keys every training stage shares: the recipe and the data."""
    _number(cfg, "epochs", lambda v: v >= 1, "an integer >= 1", int)
    _number(cfg, "batch_size", lambda v: v >= 1, "an integer >= 1", int)
    _number(cfg, "lr", lambda v: v > 0, "a number > 0")
    _number(cfg, "data.jitter", lambda v: 0 <= v <= 13, "an integer number of pixels in 0..13", int)
    _number(cfg, "data.val_size", lambda v: v >= 0, "an integer >= 0", int)
    if cfg.data.train_limit is not None:
        _number(cfg, "data.train_limit", lambda v: v >= 1, "null or an integer >= 1", int)
    _validate_transfer(cfg)
    if cfg.optim.schedule not in SCHEDULES:
        raise KDError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    if cfg.optim.get("clip_grad_norm") is not None:
        _number(cfg, "optim.clip_grad_norm", lambda v: v > 0, "null or a number > 0")
    for key in ("optim.momentum", "optim.momentum_start"):
        _number(cfg, key, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _class_list(value, key, allow_null=False):
    if value is None and allow_null:
        return None
    if not OmegaConf.is_list(value) or not all(isinstance(c, int) and 0 <= c <= 9 for c in value):
        raise KDError(f"{key} must be a list of digits 0..9, e.g. {key}=[3], got {value!r}")
    return list(value)


def _validate_transfer(cfg):
    if cfg.data.get("transfer") is None:
        return
    _class_list(cfg.data.transfer.exclude, "data.transfer.exclude")
    _class_list(cfg.data.transfer.include, "data.transfer.include", allow_null=True)
    _number(cfg, "data.transfer.fraction", lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.03")
    _number(cfg, "data.transfer.seed", lambda v: True, "an integer", int)


def _validate_bias(cfg):
    shift = cfg.get("bias_shift")
    if shift is not None and (not OmegaConf.is_dict(shift) or not all(
            isinstance(k, int) and 0 <= k <= 9 and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in shift.items())):
        raise KDError(f"bias_shift must map digits to numbers, e.g. 'bias_shift={{3:3.5}}', got {shift!r}")
    if cfg.get("fit_bias"):
        _class_list(cfg.fit_bias, "fit_bias")
        if shift:
            raise KDError("give bias_shift or fit_bias, not both")


# ---- shared pieces -------------------------------------------------------------------------------

def _device(cfg):
    # Flush denormals to zero: as a distilled student grows confident, float32 underflow makes
    # denormal values that the CPU handles ~2x slower (a distill epoch went from 1.1 s to 2.4 s
    # on 20k images); results were the same to the last test error.
    torch.set_flush_denormal(True)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def check_resume(run_dir, out_dir=None):
    """A run folder that `resume=` can continue: it has a state.pt and no checkpoint.pt yet, and
    (once Hydra runs) it is this run's own folder. Returns the state's path."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.pt").exists():
        raise KDError(f"{run_dir} already finished (it has checkpoint.pt); nothing to resume")
    if not (run_dir / STATE_FILE).exists():
        raise KDError(f"{run_dir} has no {STATE_FILE} to resume from (it stopped before its first epoch ended)")
    if out_dir is not None and run_dir.resolve() != Path(out_dir).resolve():
        raise KDError(f"resume={run_dir} must run in that folder; drop hydra.run.dir")
    return run_dir / STATE_FILE


def _resume_state(cfg, out_dir):
    return check_resume(cfg.resume, out_dir) if cfg.get("resume") else None


def _setup(stage, cfg, out_dir):
    """Check the values, seed, and load the data: (train_x, train_y, test_x, test_y, val or None),
    the training part cut down to the transfer set, and what that transfer set is."""
    validate(stage, cfg)
    _resume_state(cfg, out_dir)
    device = _device(cfg)
    torch.manual_seed(int(cfg.seed))
    limit = cfg.data.get("train_limit")
    train_x, train_y, test_x, test_y = load_mnist(cfg.data.root, cfg.data.download, device,
                                                  None if limit is None else int(limit), cfg.data.name)
    val = None
    if cfg.data.val_size:
        if cfg.data.val_size >= train_x.shape[0]:
            raise KDError(f"data.val_size={cfg.data.val_size} leaves no training images "
                          f"(there are {train_x.shape[0]})")
        train_x, train_y, *val = split_validation(train_x, train_y, int(cfg.data.val_size))
    t = cfg.data.transfer
    train_x, train_y, transfer = transfer_set(train_x, train_y, t.exclude, t.include,
                                              float(t.fraction), int(t.seed))
    return device, (train_x, train_y, test_x, test_y, val), transfer


def _recipe(cfg):
    o = cfg.optim
    return Recipe(epochs=int(cfg.epochs), batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                  momentum=float(o.momentum), momentum_start=float(o.momentum_start),
                  momentum_ramp_epochs=float(o.momentum_ramp_epochs), nesterov=bool(o.nesterov),
                  weight_decay=float(o.weight_decay), schedule=o.schedule,
                  warmup_epochs=float(o.warmup_epochs), lr_decay=float(o.lr_decay),
                  lr_times_one_minus_momentum=bool(o.lr_times_one_minus_momentum),
                  clip_grad_norm=None if o.get("clip_grad_norm") is None else float(o.clip_grad_norm))


def _model(cfg, device, in_features, out_features):
    m = cfg.model
    return MLP(hidden=list(m.hidden), in_features=in_features, out_features=out_features,
               dropout_input=m.dropout_input, dropout_hidden=m.dropout_hidden).to(device)


def _errors_fn(test_x, test_y, val, batch_size):
    """Per-epoch monitoring: test errors, and validation errors when a split is held out."""
    def errors(model):
        row = {"test_errors": count_errors(predict_logits(model, test_x, batch_size), test_y)["test_errors"]}
        if val is not None:
            row["val_errors"] = count_errors(predict_logits(model, val[0], batch_size), val[1])["test_errors"]
        return row
    return errors


def _fit_and_save(stage, cfg, out_dir, started, data, model, targets, loss_fn, extra, teacher=None,
                  batch_targets=None):
    """Train, count the final test errors, write checkpoint.pt and metrics.json."""
    train_x, train_y, test_x, test_y, val = data
    batch = int(cfg.eval_batch_size)
    state_path = Path(out_dir) / STATE_FILE
    result = train(model, train_x, targets, loss_fn, _recipe(cfg),
                   max_norm=cfg.model.max_norm, jitter_pixels=int(cfg.data.jitter),
                   evaluate=_errors_fn(test_x, test_y, val, batch), desc=stage,
                   state_path=state_path, state_extra={"stage": stage, "teacher": teacher},
                   batch_targets=batch_targets)
    counts = count_errors(predict_logits(model, test_x, batch), test_y)
    if val is not None:
        extra = {**extra, "val_size": int(val[1].numel()),
                 "val_errors": count_errors(predict_logits(model, val[0], batch), val[1])["test_errors"]}
    metrics = {
        "stage": stage, **counts,
        "test_error_rate": counts["test_errors"] / counts["test_total"],
        "epochs": int(cfg.epochs), "train_images": int(train_x.shape[0]),
        "train_seconds": round(result["train_seconds"], 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "seed": int(cfg.seed), "device": str(train_x.device), "arch": model.arch, **extra,
        "history": result["history"],
    }
    payload = {"stage": stage, "arch": model.arch,
               "state_dict": cpu_weights(model),
               "config": OmegaConf.to_container(cfg, resolve=True), "metrics": metrics}
    if teacher is not None:
        payload["teacher"] = teacher
    save_checkpoint(Path(out_dir) / "checkpoint.pt", payload)
    state_path.unlink(missing_ok=True)  # finished: the checkpoint supersedes the resumable state
    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    save_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


# ---- the stages ----------------------------------------------------------------------------------

def _train_on_labels(stage, cfg, out_dir):
    started = time.perf_counter()
    device, data, transfer = _setup(stage, cfg, out_dir)
    model = _model(cfg, device, data[0][0].numel(), 10)
    return _fit_and_save(stage, cfg, out_dir, started, data, model, (data[1],),
                         torch.nn.functional.cross_entropy, {"transfer": transfer})


def train_teacher(cfg, out_dir):
    return _train_on_labels("train-teacher", cfg, out_dir)


def train_student(cfg, out_dir):
    return _train_on_labels("train-student", cfg, out_dir)


def _recorded_teachers(state_path):
    """The teachers this run started with (not whichever is newest now), each checked unchanged."""
    recorded = load_checkpoint(state_path)["teacher"]
    paths = []
    for r in recorded if isinstance(recorded, list) else [recorded]:
        path = Path(r["path"])
        if not path.is_file() or sha256_of(path) != r["sha256"]:
            raise KDError(f"the teacher this run started from, {path}, is gone or changed; cannot resume")
        paths.append(path)
    return paths


def distill(cfg, out_dir):
    started = time.perf_counter()
    validate("distill", cfg)  # before looking for a teacher: a bad T is the first thing to report
    state_path = _resume_state(cfg, out_dir)
    paths = resolve_teacher(cfg.teacher) if state_path is None else _recorded_teachers(state_path)
    device, data, transfer = _setup("distill", cfg, out_dir)
    train_x, train_y = data[0], data[1]
    in_features = train_x[0].numel()
    teachers, infos = zip(*(load_teacher(p, device, in_features, 10, cfg.data.name) for p in paths))
    T, alpha, kind, combine = float(cfg.T), float(cfg.alpha), cfg.loss, cfg.teacher_combine

    def targets_of(x, batch=int(cfg.eval_batch_size)):
        """What the student matches: the teachers' combined log-probabilities at T, or for
        logit matching their mean logit."""
        logits = [teacher_logits(t, x, batch) for t in teachers]
        if kind == "logit_mse":
            return torch.stack(logits).mean(0) if len(logits) > 1 else logits[0]
        if len(logits) == 1:
            return soft_targets(logits[0], T)
        return combine_log_probs(torch.stack([soft_targets(v, T) for v in logits]), combine)

    if int(cfg.data.jitter) == 0:
        # the transfer set is not augmented, so the teachers run once, not once per batch
        fixed, per_batch = (targets_of(train_x),), None
        del teachers
    else:  # every batch is new: the teachers run on it, in eval mode and without autograd
        fixed, per_batch = (), lambda xb: (targets_of(xb),)
    model = _model(cfg, device, in_features, 10)
    if kind == "logit_mse":
        loss_of = lambda z, y, v: logit_matching_loss(z, y, v, alpha)  # noqa: E731
    else:
        loss_of = lambda z, y, log_p: distillation_loss(z, y, log_p, T, alpha)  # noqa: E731
    if alpha > 0:
        targets, loss_fn = (train_y, *fixed), loss_of
    else:  # an unlabeled transfer set: the labels are not even handed to the loop
        targets, loss_fn = fixed, lambda z, t: loss_of(z, None, t)
    record = [{"path": i["path"], "sha256": i["sha256"]} for i in infos]
    ensemble = {"teacher_combine": combine} if len(infos) > 1 and kind != "logit_mse" else {}
    return _fit_and_save("distill", cfg, out_dir, started, data, model, targets, loss_fn,
                         {"T": T, "alpha": alpha, "loss": kind, **ensemble,
                          "teacher": infos[0] if len(infos) == 1 else list(infos), "transfer": transfer},
                         teacher=record[0] if len(record) == 1 else record, batch_targets=per_batch)


def _validation_for(cfg, ckpt, device):
    """The validation split to fit a bias shift on: the one the checkpoint's run held out (same
    fixed split), or data.val_size=N given here. Never the test set."""
    trained = (ckpt.get("config") or {}).get("data") or {}
    trained_val = int(trained.get("val_size") or 0)
    val_size = int(cfg.data.val_size) or trained_val
    if not val_size:
        raise KDError("fit_bias fits on a validation split, and this checkpoint was trained on the whole "
                      "training set: train it with data.val_size=10000, or pass data.val_size=N here "
                      "(those images were then seen in training)")
    limit = cfg.data.train_limit if cfg.data.train_limit is not None else trained.get("train_limit")
    train_x, train_y, _, _ = load_mnist(cfg.data.root, cfg.data.download, device,
                                        None if limit is None else int(limit), cfg.data.name)
    if val_size >= train_x.shape[0]:
        raise KDError(f"data.val_size={val_size} is not smaller than the {train_x.shape[0]} training images")
    _, _, val_x, val_y = split_validation(train_x, train_y, val_size)
    return val_x, val_y, val_size == trained_val


def _bias_correction(cfg, ckpt, model, device, test_logits, test_y, batch):
    """Apply bias_shift, or fit one shift for the fit_bias classes on validation data; returns the
    shifted test logits and a record of the errors before and after."""
    shift = {int(k): float(v) for k, v in (cfg.get("bias_shift") or {}).items()}
    record = {}
    if cfg.get("fit_bias"):
        classes = sorted(int(c) for c in cfg.fit_bias)
        val_x, val_y, held_out = _validation_for(cfg, ckpt, device)
        val_logits = predict_logits(model, val_x, batch)
        value, val_after = fit_bias_shift(val_logits, val_y, classes)
        shift = {c: value for c in classes}
        record = {"fitted_on": "validation split", "val_size": int(val_y.numel()),
                  "val_held_out_from_training": held_out,
                  "val_errors_before": count_errors(val_logits, val_y)["test_errors"],
                  "val_errors_after": val_after}
    classes = sorted(shift)

    def summary(logits):
        counts = count_errors(logits, test_y)
        return {"test_errors": counts["test_errors"], "per_class_errors": counts["per_class_errors"],
                "on_shifted_classes": errors_on(counts, classes, test_y)}

    shifted = shift_biases(test_logits, shift)
    before, after = summary(test_logits), summary(shifted)
    print(f"bias shift {', '.join(f'{c}: {v:+.2f}' for c, v in shift.items())}"
          f"{' (fitted on the validation split)' if record else ''}: test errors {before['test_errors']} -> "
          f"{after['test_errors']}; on classes {classes} ({after['on_shifted_classes']['images']} images) "
          f"{before['on_shifted_classes']['errors']} -> {after['on_shifted_classes']['errors']}", flush=True)
    return shifted, {"shift": {str(c): v for c, v in shift.items()}, **record, "before": before, "after": after}


def train_specialists(cfg, out_dir):
    """Paper section 5 on a small scale: cluster the generalist's confusable classes, fine-tune one
    specialist per subset (from the generalist's weights, on half subset / half dustbin data),
    correct each dustbin for the oversampling, and combine by minimising the summed KLs."""
    started = time.perf_counter()
    validate("train-specialists", cfg)
    path = resolve_teacher(cfg.generalist)[0]
    device, data, transfer = _setup("train-specialists", cfg, out_dir)
    train_x, train_y, test_x, test_y, _ = data
    generalist, info = load_teacher(path, device, train_x[0].numel(), 10, cfg.data.name)
    batch = int(cfg.eval_batch_size)
    train_log_p = torch.log_softmax(predict_logits(generalist, train_x, batch), 1)
    subsets = [c for c in covariance_clusters(train_log_p.cpu(), int(cfg.clusters), int(cfg.seed)) if len(c) > 1]
    if not subsets:
        raise KDError(f"clusters={cfg.clusters} left no subset of two or more classes; use fewer clusters")
    models, records = [], []
    for i, classes in enumerate(subsets):
        xs, ys, shift = specialist_data(train_x, train_y, classes, int(cfg.seed) + i)
        model = build_mlp({**generalist.arch, "out_features": len(classes) + 1}).to(device)
        with torch.no_grad():
            for mine, theirs in zip(model.hidden, generalist.hidden):
                mine.load_state_dict(theirs.state_dict())
            model.out.weight[:], model.out.bias[:] = specialist_head(generalist.out, classes)
        result = train(model, xs, (ys,), torch.nn.functional.cross_entropy, _recipe(cfg),
                       jitter_pixels=int(cfg.data.jitter), desc=f"specialist {classes}")
        with torch.no_grad():
            model.out.bias[-1] += shift  # undo the dustbin's under-representation in the mix
        models.append(model.eval())
        records.append({"classes": classes, "train_images": int(ys.numel()), "dustbin_shift": round(shift, 6),
                        "train_seconds": round(result["train_seconds"], 3), "arch": model.arch,
                        "state_dict": cpu_weights(model)})
    p_g = torch.softmax(predict_logits(generalist, test_x, batch), 1)
    p_m = [torch.softmax(predict_logits(m, test_x, batch), 1) for m in models]
    active = active_specialists(p_g, subsets, int(cfg.top_n))
    q = combine(p_g, p_m, subsets, active)
    alone, together = count_errors(p_g.log(), test_y), count_errors(q.log(), test_y)
    any_active = active.any(1)
    metrics = {"stage": "train-specialists", **together,
               "test_error_rate": together["test_errors"] / together["test_total"],
               "generalist_test_errors": alone["test_errors"],
               "generalist_per_class_errors": alone["per_class_errors"],
               "cases_with_active_specialists": int(any_active.sum()),
               "errors_where_active": {"generalist": int((p_g.argmax(1) != test_y)[any_active].sum()),
                                       "combined": int((q.argmax(1) != test_y)[any_active].sum())},
               "subsets": subsets, "clusters": int(cfg.clusters), "top_n": int(cfg.top_n),
               "specialists": [{k: v for k, v in r.items() if k not in ("state_dict", "arch")} for r in records],
               "generalist": info, "transfer": transfer, "epochs": int(cfg.epochs),
               "train_images": int(train_x.shape[0]), "seed": int(cfg.seed), "device": str(device),
               "train_seconds": round(sum(r["train_seconds"] for r in records), 3)}
    save_checkpoint(Path(out_dir) / "checkpoint.pt", {
        "stage": "train-specialists", "arch": generalist.arch,
        "state_dict": cpu_weights(generalist),
        "specialists": records, "config": OmegaConf.to_container(cfg, resolve=True),
        "teacher": {"path": info["path"], "sha256": info["sha256"]}, "metrics": metrics})
    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    print(f"generalist alone: {alone['test_errors']} test errors; with specialists {subsets} "
          f"(active on {metrics['cases_with_active_specialists']} cases): {together['test_errors']}", flush=True)
    save_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def evaluate(cfg, out_dir):
    started = time.perf_counter()
    validate("evaluate", cfg)
    paths = list(cfg.checkpoint) if OmegaConf.is_list(cfg.checkpoint) else [cfg.checkpoint]
    if not paths or not all(isinstance(p, str) for p in paths):
        raise KDError(f"checkpoint must be a path to a checkpoint.pt, or a list of them, got {cfg.checkpoint!r}")
    if len(paths) > 1 and (cfg.get("bias_shift") or cfg.get("fit_bias")):
        raise KDError("bias_shift and fit_bias take one checkpoint, not an ensemble")
    device = _device(cfg)
    _, _, test_x, test_y = load_mnist(cfg.data.root, cfg.data.download, device, train_limit=1,
                                      name=cfg.data.name)
    batch = int(cfg.eval_batch_size)
    loaded = [load_model(p, device, cfg.data.name) for p in paths]
    logits = [predict_logits(model, test_x, batch) for _, model in loaded]
    extra = {}
    if len(paths) > 1:  # an ensemble: each member, then the members' combined distribution
        extra["members"] = [{"checkpoint": str(Path(p).resolve()), "stage": ckpt["stage"],
                             "test_errors": count_errors(v, test_y)["test_errors"]}
                            for p, (ckpt, _), v in zip(paths, loaded, logits)]
        log_probs = torch.stack([torch.log_softmax(v, dim=1) for v in logits])
        extra["ensemble_test_errors"] = {how: count_errors(combine_log_probs(log_probs, how), test_y)["test_errors"]
                                         for how in COMBINE}
        extra["combine"] = cfg.combine
        for m in extra["members"]:
            print(f"member {m['checkpoint']}: test errors {m['test_errors']}", flush=True)
        print("ensemble: " + ", ".join(f"{how} mean {n}" for how, n in extra["ensemble_test_errors"].items()), flush=True)
        final = combine_log_probs(log_probs, cfg.combine)
    else:
        final = logits[0]
        if cfg.get("bias_shift") or cfg.get("fit_bias"):
            ckpt, model = loaded[0]
            final, extra["bias"] = _bias_correction(cfg, ckpt, model, device, final, test_y, batch)
    counts = count_errors(final, test_y)
    first = loaded[0][0]
    metrics = {"stage": "evaluate", **counts, "test_error_rate": counts["test_errors"] / counts["test_total"],
               "checkpoint": str(Path(paths[0]).resolve()) if len(paths) == 1 else [str(Path(p).resolve()) for p in paths],
               "checkpoint_stage": first["stage"], "arch": first["arch"], "seed": int(cfg.seed),
               "device": str(device), **extra, "wall_seconds": round(time.perf_counter() - started, 3)}
    save_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


STAGES = {"train-teacher": train_teacher, "train-student": train_student,
          "distill": distill, "evaluate": evaluate, "train-specialists": train_specialists}
