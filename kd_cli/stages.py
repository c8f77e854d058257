"""One function per stage: (cfg, out_dir) -> metrics, reading like the paper's procedure. The
config was checked before the run folder existed (config.py); prepare.py turns it into data,
model and recipe, and run.py owns the folder (resume, finish)."""
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import provenance, run
from .checkpoint import cpu_weights, load_checkpoint, save_json, sha256_of
from .config import COMBINE
from .data import load_data, split_validation
from .errors import KDError
from .evaluate import bias_correction, count_errors, predict_logits
from .losses import distillation_loss, hard_label_loss, logit_matching_loss
from .prepare import data_of, device_of, elastic_of, errors_fn, model_of, recipe_of
from .specialists import covariance_clusters, evaluate_combination, train_specialist
from .teacher_cache import logits_source
from .teachers import (SoftTargets, caches_shifts, combine_log_probs, load_model, load_teacher, resolve_checkpoints,
                       resolve_generalist, resolve_teacher)
from .train import Diverged, train


def _fit_and_finish(stage, cfg, out_dir, started, data, model, labels, loss_fn, extra,
                    targets=None, teacher=None):
    """Train (train() continues by itself from out_dir/state.pt when there is one), count the
    final errors, write checkpoint.pt and metrics.json."""
    train_x, _, test_x, test_y, val = data
    batch = int(cfg.eval_batch_size)
    code_and_data = provenance.inputs(cfg)  # resume and a sweep's continuation check them
    result = train(model, train_x, labels, loss_fn, recipe_of(cfg), targets=targets,
                   max_norm=cfg.model.max_norm, jitter_pixels=int(cfg.data.jitter), elastic=elastic_of(cfg),
                   evaluate=errors_fn(test_x, test_y, val, batch), eval_every=int(cfg.eval_every), desc=stage,
                   state_path=Path(out_dir) / run.STATE, state_extra={"stage": stage, "teacher": teacher,
                                                                  "precision": cfg.precision, **code_and_data},
                   started=started)
    counts = count_errors(predict_logits(model, test_x, batch), test_y)
    if val is not None:
        extra = {**extra, "val_size": int(val[1].numel()),
                 "val_errors": count_errors(predict_logits(model, val[0], batch), val[1])["test_errors"]}
    metrics = {"stage": stage, **counts, "test_error_rate": counts["test_errors"] / counts["test_total"],
               "epochs": int(cfg.epochs), "train_images": int(train_x.shape[0]),
               "train_seconds": round(result["train_seconds"], 3), "invocations": result["invocations"],
               "seed": int(cfg.seed),
               "device": str(train_x.device), "precision": cfg.precision,
               # CPU threads change float rounding (matrix-multiply blocking), so a result repeats
               # bit for bit with the same seed, machine and threads (joblib jobs run with fewer)
               "threads": torch.get_num_threads(), "arch": model.arch, **extra, **code_and_data,
               "history": result["history"]}
    if result["wall_seconds_partial"]:  # resumed from a state that predates wall-time bookkeeping
        metrics["wall_seconds_partial"] = True
    payload = {"arch": model.arch, "state_dict": cpu_weights(model), "config": OmegaConf.to_container(cfg, resolve=True)}
    if teacher is not None:
        payload["teacher"] = teacher
    return run.finish(out_dir, started, stage, payload, metrics, result["earlier_wall_seconds"])


def _train_on_labels(stage, cfg, out_dir):
    started = time.perf_counter()
    state_path = run.start(out_dir, cfg.get("resume"))
    data, transfer = data_of(cfg, device_of(cfg, state_path))
    model = model_of(cfg, data[0].device, data[0][0].numel())
    return _fit_and_finish(stage, cfg, out_dir, started, data, model, data[1], hard_label_loss,
                           {"transfer": transfer})


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
    """The student learns the teachers' soft targets at T (paper, section 2), with weight alpha on
    the hard labels; alpha=0 hands the loop no labels at all."""
    started = time.perf_counter()
    state_path = run.start(out_dir, cfg.resume)
    paths = resolve_teacher(cfg.teacher) if state_path is None else _recorded_teachers(state_path)
    data, transfer = data_of(cfg, device_of(cfg, state_path))
    train_x, train_y = data[0], data[1]
    teachers, infos = zip(*(load_teacher(p, train_x.device, train_x[0].numel(), 10, cfg.data.name, cfg.data.root)
                                 for p in paths))
    T, alpha, loss = float(cfg.T), float(cfg.alpha), cfg.loss
    # the teachers run once, before training (over the transfer set, or each of its shifted
    # copies), or on every batch: a jittered one in a run too short for the copies to pay, and
    # every elastically distorted one (each is new)
    shift = int(cfg.data.jitter)
    per_batch = elastic_of(cfg) is not None or (shift > 0 and not caches_shifts(int(cfg.epochs), shift))
    logits_of, kept = logits_source(cfg.teacher_cache, [i["sha256"] for i in infos], train_x, shift,
                                    int(cfg.eval_batch_size))
    targets = SoftTargets(teachers, T, train_x, loss, cfg.teacher_combine, max_shift=shift,
                          per_batch=per_batch, batch_size=int(cfg.eval_batch_size), logits_of=logits_of)
    del teachers  # SoftTargets holds them as long as it needs them
    if loss == "logit_mse":
        loss_fn = lambda z, y, v: logit_matching_loss(z, y, v, alpha)  # noqa: E731
    elif loss == "kd":
        loss_fn = lambda z, y, log_p: distillation_loss(z, y, log_p, T, alpha)  # noqa: E731
    else:  # config.LOSSES lists where a new loss goes
        raise ValueError(f"unknown loss {loss!r}")
    record = [{"path": i["path"], "sha256": i["sha256"]} for i in infos]
    ensemble = {"teacher_combine": cfg.teacher_combine} if len(infos) > 1 and loss != "logit_mse" else {}
    extra = {"T": T if loss == "kd" else None, "alpha": alpha, "loss": loss, **ensemble,
             "teacher": infos[0] if len(infos) == 1 else list(infos), "transfer": transfer,
             "teacher_logits": kept or None}  # the cache files read (reused) or written, if any
    model = model_of(cfg, train_x.device, train_x[0].numel())
    try:
        return _fit_and_finish("distill", cfg, out_dir, started, data, model, train_y if alpha > 0 else None,
                               loss_fn, extra, targets=targets,
                               teacher=record[0] if len(record) == 1 else record)
    except Diverged as e:
        teacher_ok = targets.finite(train_x)
        raise Diverged(f"{e}" + ("" if teacher_ok else "; the teacher's outputs are not finite: check the teacher")
                       + (f" (the soft term at T={T:g} has weight {1 - alpha:g} x T^2)" if loss == "kd" else "")) from None


def fit_bias_split(cfg, ckpt):
    """(val_size, the data config the checkpoint trained with): the validation split a bias shift
    is fitted on is the one the checkpoint's run held out, or data.val_size=N given here; refused
    where there is neither (never the test set)."""
    trained = (ckpt.get("config") or {}).get("data") or {}
    held = int(trained.get("val_size") or 0)
    for key, given, then in (("val_size", cfg.data.val_size, held), ("train_limit", cfg.data.train_limit,
                                                                     trained.get("train_limit"))):
        if held and given not in (None, 0) and given != then:  # another split holds images it trained on
            raise KDError(f"this checkpoint's run held out its validation split with data.{key}={then}, and a bias "
                          f"is fitted on that split: drop data.{key}={given} (it would cut one that holds images "
                          "the model trained on)")
    other = provenance.trained_on_other_files(ckpt.get("metrics"), cfg.data.root, cfg.data.name) if held else None
    if other:  # the same cut of other files holds other images
        raise KDError(f"this checkpoint's run held out its validation split from other {cfg.data.name} {other} than "
                      f"those under data.root={cfg.data.root}, and a bias is fitted on that split: set KD_DATA_ROOT "
                      "to the folder it trained from")
    val_size = int(cfg.data.val_size) or held
    if not val_size:
        raise KDError("fit_bias fits on a validation split, and this checkpoint was trained on the whole "
                      "training set: train it with data.val_size=10000, or pass data.val_size=N here "
                      "(those images were then seen in training)")
    return val_size, trained


def _validation_for(cfg, ckpt, device):
    """The validation split to fit a bias shift on (fit_bias_split), and whether it is the one the
    checkpoint's run held out."""
    val_size, trained = fit_bias_split(cfg, ckpt)
    trained_val = int(trained.get("val_size") or 0)
    limit = cfg.data.train_limit if cfg.data.train_limit is not None else trained.get("train_limit")
    train_x, train_y, _, _ = load_data(cfg.data.root, cfg.data.download, device,
                                       None if limit is None else int(limit), cfg.data.name)
    if val_size >= train_x.shape[0]:
        raise KDError(f"data.val_size={val_size} is not smaller than the {train_x.shape[0]} training images")
    # the same cut as prepare.data_of's for training (load_data, then split_validation's fixed seed)
    _, _, val_x, val_y = split_validation(train_x, train_y, val_size)
    # the same split only if it is cut from the same images: another train_limit moves its border
    same_images = limit == trained.get("train_limit") and cfg.data.name == trained.get("name", cfg.data.name)
    return val_x, val_y, val_size == trained_val and same_images


def evaluate(cfg, out_dir):
    """Test errors of a checkpoint, of an ensemble of them, or of one after a bias shift."""
    started = time.perf_counter()
    paths = resolve_checkpoints(cfg.checkpoint)
    device = device_of(cfg)
    _, _, test_x, test_y = load_data(cfg.data.root, cfg.data.download, device, train_limit=1, name=cfg.data.name)
    batch = int(cfg.eval_batch_size)
    loaded = [load_model(p, device, cfg.data.name) for p in paths]
    logits = [predict_logits(model, test_x, batch) for _, model in loaded]
    extra, final = {}, logits[0]
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
    elif cfg.bias_shift or cfg.fit_bias:
        ckpt, model = loaded[0]
        val = {}
        if cfg.fit_bias:
            val_x, val_y, held_out = _validation_for(cfg, ckpt, device)
            val = {"fit_classes": sorted(int(c) for c in cfg.fit_bias), "val_y": val_y,
                   "val_logits": predict_logits(model, val_x, batch)}
        shift = {int(k): float(v) for k, v in (cfg.bias_shift or {}).items()}
        final, extra["bias"] = bias_correction(final, test_y, shift, **val)
        if cfg.fit_bias:
            extra["bias"]["val_held_out_from_training"] = held_out
        _print_bias(extra["bias"])
    counts = count_errors(final, test_y)
    first = loaded[0][0]
    metrics = {"stage": "evaluate", **counts, "test_error_rate": counts["test_errors"] / counts["test_total"],
               "checkpoint": str(Path(paths[0]).resolve()) if len(paths) == 1 else [str(Path(p).resolve()) for p in paths],
               "checkpoint_stage": first["stage"], "arch": first["arch"], "seed": int(cfg.seed),
               "device": str(device), **extra, "wall_seconds": round(time.perf_counter() - started, 3),
               # what a sweep's continuation checks the files against (provenance.differences)
               "checkpoint_files": [{"path": str(Path(p).resolve()), "sha256": sha256_of(p)} for p in paths],
               **provenance.inputs(cfg)}
    save_json(Path(out_dir) / run.METRICS, metrics)
    return metrics


def _fitted_on(b):
    if b.get("val_held_out_from_training") is False:
        return " (fitted on training images the model trained on: its run held out no validation split)"
    return " (fitted on the validation split)"


def _print_bias(b):
    before, after = b["before"], b["after"]
    print(f"bias shift {', '.join(f'{c}: {v:+.2f}' for c, v in b['shift'].items())}"
          f"{_fitted_on(b) if 'fitted_on' in b else ''}: test errors {before['test_errors']} -> "
          f"{after['test_errors']}; on classes {sorted(int(c) for c in b['shift'])} "
          f"({after['on_shifted_classes']['images']} images) {before['on_shifted_classes']['errors']} -> "
          f"{after['on_shifted_classes']['errors']}", flush=True)


def train_specialists(cfg, out_dir):
    """Paper section 5 on a small scale: cluster the generalist's confusable classes, fine-tune one
    specialist per subset (from the generalist's weights, on half subset / half dustbin data),
    correct each dustbin for the oversampling, and combine by minimising the summed KLs."""
    started = time.perf_counter()
    run.start(out_dir)
    path = resolve_generalist(cfg.generalist)
    (train_x, train_y, test_x, test_y, _), transfer = data_of(cfg, device_of(cfg))
    generalist, info = load_teacher(path, train_x.device, train_x[0].numel(), 10, cfg.data.name, cfg.data.root,
                                    role="generalist")
    batch = int(cfg.eval_batch_size)
    train_log_p = torch.log_softmax(predict_logits(generalist, train_x, batch), 1)
    subsets = [c for c in covariance_clusters(train_log_p.cpu(), int(cfg.clusters), int(cfg.seed)) if len(c) > 1]
    if not subsets:
        raise KDError(f"clusters={cfg.clusters} left no subset of two or more classes; use fewer clusters")
    trained = [train_specialist(generalist, classes, train_x, train_y, recipe_of(cfg), int(cfg.data.jitter),
                                int(cfg.seed) + i, elastic_of(cfg)) for i, classes in enumerate(subsets)]
    records = [r for _, r in trained]
    metrics = {"stage": "train-specialists",
               **evaluate_combination(generalist, [m for m, _ in trained], subsets, int(cfg.top_n), test_x, test_y, batch),
               "subsets": subsets, "clusters": int(cfg.clusters), "top_n": int(cfg.top_n),
               "specialists": [{k: v for k, v in r.items() if k not in ("state_dict", "arch")} for r in records],
               "generalist": info, "transfer": transfer, "epochs": int(cfg.epochs),
               "train_images": int(train_x.shape[0]), "seed": int(cfg.seed), "device": str(train_x.device),
               "precision": cfg.precision, "threads": torch.get_num_threads(),
               "train_seconds": round(sum(r["train_seconds"] for r in records), 3),
               "invocations": 1,  # specialists keep no resumable state: one invocation
               **provenance.inputs(cfg)}
    run.finish(out_dir, started, "train-specialists", {
        "arch": generalist.arch, "state_dict": cpu_weights(generalist), "specialists": records,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "teacher": {"path": info["path"], "sha256": info["sha256"]}}, metrics)
    print(f"generalist alone: {metrics['generalist_test_errors']} test errors; with specialists {subsets} "
          f"(active on {metrics['cases_with_active_specialists']} cases): {metrics['test_errors']}", flush=True)
    return metrics


STAGES = {"train-teacher": train_teacher, "train-student": train_student,
          "distill": distill, "evaluate": evaluate, "train-specialists": train_specialists}
