"""The schema: the type and range of every key a user can set, checked once, before any folder
exists. One table for all stages; a key a stage does not have is simply not checked there."""
import math

from omegaconf import OmegaConf

from .errors import KDError

CONFIG_MODULE = "kd_cli.conf"  # conf/, installed as a package: Hydra's config_path="pkg://kd_cli.conf"
COMBINE = ("arithmetic", "geometric")  # how an ensemble's distributions are combined
LOSSES = ("kd", "logit_mse")  # the paper's soft-target loss at T; Caruana et al.'s logit matching
# a new loss: losses.py, stages.distill (loss_fn, the T it records, the Diverged hint),
# teachers.SoftTargets.combined (what the student matches), conf/distill.yaml's comment
SCHEDULES = ("onecycle", "cosine", "exponential", "constant")
SGD_UPDATES = ("fused", "foreach")
# data.name -> torchvision's class and folder (<root>/<folder>/raw); each has conf/data/<name>.yaml.
# Kept here, not in data.py, whose code a run's provenance records: a new data set changes no
# computing module, so stopped runs still resume and cached teacher logits stay valid.
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
# Where the soft loss is computed accurately in float32: below 0.01 logits / T overflow for
# logits of a few hundred; above 1000 KL(p || q) is smaller than float32's rounding of log p
# and log q, so the loss is noise (T=1e6 gave a negative loss of -5578).
T_RANGE = (0.01, 1000.0)
SEED_MAX = 2 ** 63 - 1  # torch's generators take 64-bit seeds
MAX_JITTER = 13  # px: a 28-px image moved further keeps half of itself or less


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low, high=None):
    need = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    return need, lambda v: _is_int(v) and v >= low and (high is None or v <= high)


def number(low=-math.inf, high=math.inf, low_open=False, high_open=False):
    if high < math.inf:
        need = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        need = f"a finite number {'>' if low_open else '>='} {low:g}"
    return need, lambda v: _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


def fraction(open_high=True):
    return ("a number in [0, 1)" if open_high else "a number in [0, 1]"), \
        lambda v: _is_number(v) and 0 <= v and (v < 1 if open_high else v <= 1)


def choice(*options):
    return f"one of {', '.join(options)}", lambda v: v in options


def flag():
    return "true or false", lambda v: isinstance(v, bool)


def digits():
    return "a list of digits 0..9, e.g. [3]", lambda v: isinstance(v, list) and all(_is_int(c) and 0 <= c <= 9 for c in v)


def widths():
    return "a list of layer widths, e.g. [800,800]", \
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(h) and h >= 1 for h in v)


def text():
    return "a path", lambda v: isinstance(v, str) and v != ""


def paths():
    return "a path or a list of paths", \
        lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and len(v) > 0 and all(isinstance(p, str) and p for p in v))


def device():
    return "auto, cpu, cuda or cuda:N", \
        lambda v: v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit())


def shifts():
    return "a map from digits to finite numbers, e.g. 'bias_shift={3:3.5}'", \
        lambda v: isinstance(v, dict) and all(_is_int(k) and 0 <= k <= 9 and _is_number(s) for k, s in v.items())


def null_or(rule):
    need, ok = rule
    return f"null or {need}", lambda v: v is None or ok(v)


# key -> (what it must be, the test); an example follows the need where it helps
SCHEMA = {
    "seed": integer(0, SEED_MAX),
    "device": device(),
    "eval_batch_size": integer(1),
    "precision": choice("auto", "fp32", "bf16"),
    "sgd_update": choice(*SGD_UPDATES),
    "eval_every": integer(1),
    "resume": null_or(text()),
    # the model
    "model.hidden": widths(),
    "model.dropout_input": fraction(),
    "model.dropout_hidden": fraction(),
    "model.max_norm": null_or(number(0, low_open=True)),
    # the data
    "data.name": choice(*DATASETS),
    "data.root": text(),
    "data.download": flag(),
    "data.train_limit": null_or(integer(1)),
    "data.jitter": integer(0, MAX_JITTER),
    "data.elastic": ("a map of scale and sigma, e.g. data.elastic.scale=34", lambda v: isinstance(v, dict)),
    # px, before the smoothing: at sigma 4 a pixel typically moves about scale / 25 (34: ~1.4 px)
    "data.elastic.scale": number(0, 200),
    "data.elastic.sigma": number(0.1, 28),  # px: the kernel stays finite and smaller than a few images
    "data.val_size": integer(0),
    "data.transfer.exclude": digits(),
    "data.transfer.include": null_or(digits()),
    "data.transfer.fraction": number(0, 1, low_open=True),
    "data.transfer.seed": integer(0, SEED_MAX),
    # the recipe; a new optim.* knob: here, the optim: block of each of conf/recipe/student.yaml,
    # teacher.yaml and hinton2012.yaml (the others inherit student's), train.Recipe, prepare.recipe_of
    "epochs": integer(1),
    "batch_size": integer(1),
    "lr": number(0, low_open=True),
    "optim.momentum": fraction(),
    "optim.momentum_start": fraction(),
    "optim.momentum_ramp_epochs": number(0),
    "optim.nesterov": flag(),
    "optim.weight_decay": number(0),
    "optim.schedule": choice(*SCHEDULES),
    "optim.warmup_epochs": number(0),
    "optim.lr_decay": number(0, low_open=True),
    "optim.lr_times_one_minus_momentum": flag(),
    "optim.clip_grad_norm": null_or(number(0, low_open=True)),
    "optim.average_last_epochs": integer(0),
    # distill
    "T": number(*T_RANGE),
    "alpha": fraction(open_high=False),
    "loss": choice(*LOSSES),
    "teacher": null_or(paths()),
    "teacher_combine": choice(*COMBINE),
    "teacher_cache": null_or(text()),
    # evaluate
    "checkpoint": paths(),
    "combine": choice(*COMBINE),
    "bias_shift": null_or(shifts()),
    "fit_bias": digits(),
    # train-specialists
    "generalist": null_or(text()),
    "clusters": integer(1, 10),
    "top_n": integer(1, 10),
}

EXAMPLES = {"T": "the temperature, e.g. T=20", "alpha": "the weight of the hard-label term, e.g. alpha=0.1"}
ABSENT = object()  # OmegaConf.select's default: tells a key that is missing from one set to None


def typed_key(override):
    """The key a command-line override sets, without Hydra's +, ++ or ~ ('++optim.lr=1': optim.lr)."""
    return override.split("=", 1)[0].lstrip("+~")


def unknown_keys(tree, prefix=""):
    """The composed keys the schema does not know (Hydra's own aside): a key added with + or ++,
    which Hydra accepts and nothing reads. A map the schema checks as a whole (bias_shift) is one key."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if key == "hydra":
            continue
        if isinstance(v, dict) and any(s.startswith(key + ".") for s in SCHEMA):
            yield from unknown_keys(v, key + ".")
        elif key not in SCHEMA:
            yield key


def _closest(key):
    """'; did you mean optim.lr_decay?' where a known key is close, else ''."""
    import difflib

    last = key.rsplit(".", 1)[-1]
    same_name = [s for s in SCHEMA if s.rsplit(".", 1)[-1] == last]
    near = same_name or difflib.get_close_matches(key, SCHEMA, n=1)
    return f"; did you mean {near[0]}?" if near else ""


def check(stage, cfg):
    """Raise KDError naming the key, what it must be and what it got, for the first value the
    stage cannot run with. Runs on the composed config before Hydra makes any folder."""
    if stage == "evaluate" and OmegaConf.is_missing(cfg, "checkpoint"):
        raise KDError("kd evaluate needs checkpoint=<path to a checkpoint.pt>")
    if stage == "distill" and OmegaConf.is_missing(cfg, "T"):
        raise KDError(f"T has no value: recipe={cfg.hydra.runtime.choices.recipe if 'hydra' in cfg else '?'} sets none; "
                      "use recipe=distill (T=5), recipe=paper (the paper's T=20), or give T=...")
    for key, (need, ok) in SCHEMA.items():
        node = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=False)
        if node is ABSENT:
            continue
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if not ok(value):
            hint = f" ({EXAMPLES[key]})" if key in EXAMPLES else ""
            raise KDError(f"{key} must be {need}{hint}, got {value!r}")
    # a resumed run continues with its own record, keys added with + before kd refused them included
    unknown = None if cfg.get("resume") else next(unknown_keys(OmegaConf.to_container(cfg)), None)
    if unknown is not None:
        raise KDError(f"unknown key '{unknown}' for kd {stage} (added with +: nothing reads it){_closest(unknown)}; "
                      f"`kd {stage} --cfg job` lists the keys")
    data = cfg.get("data") or {}
    if data.get("train_limit") is not None and data.get("val_size") and data.val_size >= data.train_limit:
        # found here, before the run's folder exists (the stage would refuse it inside a folder left behind)
        raise KDError(f"data.val_size={data.val_size} leaves no training images of data.train_limit={data.train_limit}")
    if cfg.get("bias_shift") and cfg.get("fit_bias"):
        raise KDError("give bias_shift or fit_bias, not both")
    if (cfg.get("bias_shift") or cfg.get("fit_bias")) and OmegaConf.is_list(cfg.get("checkpoint")) and len(cfg.checkpoint) > 1:
        raise KDError("bias_shift and fit_bias take one checkpoint, not an ensemble")
    if str(cfg.get("device", "cpu")).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise KDError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
