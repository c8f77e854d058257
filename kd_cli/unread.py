"""Keys a command sets that its run would not read, refused before any folder exists: a key
another stage owns, one added with + that the stage's config lacks, a recipe a preset or stage
would apply only in part, a training knob typed for kd evaluate, and keys that every job's other
settings make inert. Each would make a run, or a report of a sweep over it, look as if the key had
counted. preflight.py and job_checks.py call these; a run or sweep that continues is not asked (it
goes on as it began)."""
from importlib import resources

from omegaconf import OmegaConf

from . import config
from .config import CONFIG_MODULE, typed_key
from .errors import KDError
from .teachers import READS


def is_hydra_key(override):
    return typed_key(override).startswith("hydra")


def typed_in_order(args):
    """The keys a command sets, in the order typed, without Hydra's own."""
    return [typed_key(o) for o in args if "=" in o and not is_hydra_key(o)]


def typed_keys(args):
    return set(typed_in_order(args))


# data and training keys the evaluate config composes (it shares conf/data) but does not read
NOT_READ_BY_EVALUATE = ("precision", "sgd_update", "eval_every", "data.jitter", "data.elastic", "data.transfer")


def check_read_by_evaluate(args, cfg):
    """kd evaluate counts a checkpoint's test errors: a training knob typed for it (data.jitter,
    precision) changes nothing, and data.val_size counts only with fit_bias (the split the shift is
    fitted on); typed anyway, the user would take the numbers for what they asked."""
    for key in typed_in_order(args):  # the first typed is the one a refusal names
        if key.startswith(NOT_READ_BY_EVALUATE):
            raise KDError(f"kd evaluate does not read {key}: it counts the checkpoint's test errors as it was "
                          "trained; drop it")
        if key in ("data.val_size", "data.train_limit") and not cfg.fit_bias:
            raise KDError(f"kd evaluate reads {key} only with fit_bias (the split a bias shift is fitted on); "
                          "it counts test errors, on the whole test set: drop it, or give fit_bias=[...]")


# keys that one stage reads and no other: typed for another stage (even added with +) they would
# change nothing, and a report would show them as if they had
ONLY_READ_BY = {"distill": ("T", "alpha", "loss", "teacher", "teacher_combine", "teacher_cache"),
                "evaluate": ("checkpoint", "combine", "bias_shift", "fit_bias"),
                "train-specialists": ("generalist", "clusters", "top_n")}
# the recipes written for training stages other than kd distill (the rest set T: they distill)
NOT_DISTILLING = ("student", "teacher", "hinton2012")


def check_read_by_stage(stage, args, cfg, compose_without):
    """A key typed for a stage that does not read it: one another stage owns (T for kd
    train-student), or one added with + that the stage's own config lacks (`kd evaluate
    +epochs=5`); the run would look as if it had used it. compose_without(prefixed): the stage's
    config without the overrides that add keys. (Not asked of a run or sweep that continues: it goes
    on as it began.)"""
    typed = typed_keys(args)
    for owner, keys in ONLY_READ_BY.items():
        stray = sorted(k for k in typed if k in keys and owner != stage)
        if stray:
            raise KDError(f"{stray[0]} is read by kd {owner} only: kd {stage} would ignore it; drop it")
    if stage == "train-specialists" and "recipe" in typed:  # its own epochs and lr come after any recipe
        raise KDError("kd train-specialists fine-tunes with its own epochs and lr over the student recipe; a recipe= "
                      "would apply only in part: set epochs=, lr=, batch_size= or optim.* instead")
    added = [o for o in args if o.startswith("+") and not o.startswith("++") and not is_hydra_key(o)
             and typed_key(o) not in cfg.hydra.runtime.choices]
    if added:
        base = compose_without({typed_key(o) for o in added})
        for key in (typed_key(o) for o in added):
            if OmegaConf.select(base, key, default=config.ABSENT) is config.ABSENT:
                raise KDError(f"kd {stage} does not read {key} (added with +, its config has no such key); drop it")


def check_recipe(stage, typed, job):
    """A typed recipe= that the job would not run as typed: a distillation recipe (it sets T) for a
    training stage, or one whose keys the job's experiment preset, applied last, sets over it
    (experiment=only78 sets the epochs). Asked of every job: a sweep of recipes or presets is one
    job each."""
    if "recipe" not in typed:
        return
    recipe = OmegaConf.select(job, "hydra.runtime.choices.recipe", default=None)
    if stage != "distill" and "T" in job:
        raise KDError(f"recipe={recipe} is a distillation recipe (it sets T, which kd {stage} does not read); "
                      f"kd {stage} takes recipe={' | '.join(NOT_DISTILLING)}")
    experiment = OmegaConf.select(job, "hydra.runtime.choices.experiment", default=None)
    if experiment:
        keys, own = _preset(experiment)
        overridden = sorted(k for k in keys if k in RECIPE_KEYS and k not in typed)
        if overridden and recipe != own:  # the preset, applied last, would set them over the typed recipe's
            raise KDError(f"experiment={experiment} sets {', '.join(overridden)} over recipe={recipe}'s: give "
                          f"{overridden[0]}= too (the value you mean), or drop recipe=")


# what a recipe (conf/recipe/) sets: an experiment preset that sets one too overrides a typed recipe
RECIPE_KEYS = ("epochs", "batch_size", "lr", "T", "data.jitter", *(k for k in config.SCHEMA if k.startswith("optim.")))


def _preset(experiment):
    """(the dotted keys conf/experiment/<experiment>.yaml sets, the recipe it builds on); nothing for
    a preset kd does not ship (a user's, on hydra.searchpath), which is left as Hydra composes it."""
    try:
        tree = OmegaConf.to_container(OmegaConf.create(
            resources.files(CONFIG_MODULE).joinpath("experiment", f"{experiment}.yaml").read_text()))
    except FileNotFoundError:
        return set(), None
    defaults = tree.pop("defaults", None) or []
    own = next((d["override /recipe"] for d in defaults if isinstance(d, dict) and "override /recipe" in d), None)

    def flat(node, prefix=""):
        for k, v in node.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return set(flat(tree)), own


def inert_keys(stage, typed, job):
    """{key: why} of the keys typed for a job that its other settings make change nothing: a
    temperature for logit matching (no softmax) or for alpha=1 (soft targets weighted 0), a way to
    combine teachers or checkpoints other than the default where there is one, a schedule's knob for
    another schedule. check_jobs refuses a key that is inert in every job of a command: typed for
    nothing (swept, an axis along which every job computes the same)."""
    found = {}

    def refuse(key, why):
        found.setdefault(key, why)

    def one(key):  # the job names one file (a folder may hold several); unknown until it exists
        try:
            return len(READS[stage][1](job[key])) == 1
        except KDError:  # not there (yet): check_inputs or the job says so
            return False
    if stage == "distill":
        if "T" in typed and job.loss == "logit_mse":
            refuse("T", "loss=logit_mse matches logits, without a softmax at any temperature (to compare it with "
                        "loss=kd over T, run it as a sweep of its own)")
        if float(job.alpha) == 1:
            for key in sorted(typed & {"T", "loss", "teacher_combine"}):
                if key == "T" or job[key] not in ("kd", "arithmetic"):  # typed as the default: harmless
                    refuse(key, "alpha=1 gives the soft targets weight 0 (plain hard-label training)")
        if "teacher_combine" in typed and job.teacher_combine != "arithmetic":  # the default, typed or not
            if job.loss == "logit_mse":
                refuse("teacher_combine", "loss=logit_mse matches the teachers' mean logit")
            if job.teacher is not None and one("teacher"):
                refuse("teacher_combine", "it combines an ensemble's teachers, and there is one")
    if stage == "evaluate" and "combine" in typed and job.combine != "arithmetic" and one("checkpoint"):
        refuse("combine", "it combines an ensemble's checkpoints, and there is one")
    if "optim.lr_decay" in typed and job.optim.schedule != "exponential":
        refuse("optim.lr_decay", f"only optim.schedule=exponential reads it (this is {job.optim.schedule})")
    if "optim.momentum_start" in typed and not job.optim.momentum_ramp_epochs:
        refuse("optim.momentum_start", "momentum starts there only with optim.momentum_ramp_epochs > 0")
    if "data.elastic.sigma" in typed and "elastic" in job.data and not job.data.elastic.scale:
        refuse("data.elastic.sigma", "the elastic distortion is off while data.elastic.scale is 0")
    return found
