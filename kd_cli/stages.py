"""One function per stage: (cfg, out_dir) -> metrics. Reads the config, calls plain functions."""
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import run
from .checkpoint import cpu_weights, load_checkpoint, save_json, sha256_of
from .config import COMBINE
from .data import load_mnist, split_validation, transfer_set
from .errors import KDError
from .evaluate import count_errors, errors_on, fit_bias_shift, predict_logits, shift_biases
from .specialists import active_specialists, combine, covariance_clusters, specialist_data, specialist_head
from .losses import distillation_loss, logit_matching_loss, soft_targets
from .models import MLP, build_mlp
from .teachers import combine_log_probs, load_model, load_teacher, resolve_teacher, teacher_logits
from .train import Diverged, Recipe, train


# ---- shared pieces -------------------------------------------------------------------------------

def _device(cfg):
    # Flush denormals to zero: as a distilled student grows confident, float32 underflow makes
    # denormal values that the CPU handles ~2x slower (a distill epoch went from 1.1 s to 2.4 s
    # on 20k images); results were the same to the last test error.
    torch.set_flush_denormal(True)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _resume_state(cfg, out_dir):
    """The state.pt this run continues (resume=), or None for a new run, which must not find
    another run's state or results in its folder."""
    run.remove_temporaries(out_dir)
    if cfg.get("resume"):
        state = run.check_resume(cfg.resume, out_dir)
        (Path(out_dir) / run.ERROR).unlink(missing_ok=True)  # why an earlier resume failed: gone
        return state
    if run.state_of(out_dir) in ("finished", "stopped"):
        raise KDError(f"{out_dir} already holds a run; continue it with resume= or choose a new hydra.run.dir")
    return None


def _setup(stage, cfg, out_dir):
    """Check the values, seed, and load the data: (train_x, train_y, test_x, test_y, val or None),
    the training part cut down to the transfer set, and what that transfer set is."""
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
    state_path = Path(out_dir) / run.STATE
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
        "seed": int(cfg.seed), "device": str(train_x.device), "arch": model.arch, **extra,
        "history": result["history"],
    }
    payload = {"arch": model.arch, "state_dict": cpu_weights(model),
               "config": OmegaConf.to_container(cfg, resolve=True)}
    if teacher is not None:
        payload["teacher"] = teacher
    return run.finish(out_dir, started, stage, payload, metrics)


# ---- the stages ----------------------------------------------------------------------------------

def _train_on_labels(stage, cfg, out_dir):
    started = time.perf_counter()
    _resume_state(cfg, out_dir)
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
            raise KDError(f"the teacher this run started from, {path}, is gone or changed since (sha256 "
                          f"differs); cannot resume: the result would mix two teachers. Start a new run")
        paths.append(path)
    return paths


def distill(cfg, out_dir):
    started = time.perf_counter()
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
    try:
        return _fit_and_save("distill", cfg, out_dir, started, data, model, targets, loss_fn,
                             {"T": T if kind == "kd" else None, "alpha": alpha, "loss": kind, **ensemble,
                              "teacher": infos[0] if len(infos) == 1 else list(infos), "transfer": transfer},
                             teacher=record[0] if len(record) == 1 else record, batch_targets=per_batch)
    except Diverged as e:
        sample = fixed[0][:1000] if fixed else targets_of(train_x[:1000])
        teacher_ok = bool(torch.isfinite(sample).all())
        raise Diverged(f"{e}" + ("" if teacher_ok else "; the teacher's outputs are not finite: check the teacher")
                       + (f" (the soft term at T={T:g} has weight {1 - alpha:g} x T^2)" if kind == "kd" else "")) from None


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
    _resume_state(cfg, out_dir)
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
    run.finish(out_dir, started, "train-specialists", {
        "arch": generalist.arch, "state_dict": cpu_weights(generalist), "specialists": records,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "teacher": {"path": info["path"], "sha256": info["sha256"]}}, metrics)
    print(f"generalist alone: {alone['test_errors']} test errors; with specialists {subsets} "
          f"(active on {metrics['cases_with_active_specialists']} cases): {together['test_errors']}", flush=True)
    return metrics


def evaluate(cfg, out_dir):
    started = time.perf_counter()
    paths = list(cfg.checkpoint) if OmegaConf.is_list(cfg.checkpoint) else [cfg.checkpoint]
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
    save_json(Path(out_dir) / run.METRICS, metrics)
    return metrics


STAGES = {"train-teacher": train_teacher, "train-student": train_student,
          "distill": distill, "evaluate": evaluate, "train-specialists": train_specialists}
