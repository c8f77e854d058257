"""Each job a command will launch (one, or a sweep's), checked before any runs: the checks that
join two keys, and the files it reads (data, teachers, the checkpoints kd evaluate counts). A
sweep's jobs are built for every combination of the swept values that can differ in these
(joined_keys); a sweep of seeds alone is one job standing for all. preflight.py composes the jobs
and calls check_jobs."""
import contextlib
import re

from omegaconf import DictConfig, OmegaConf

from . import config, continuation, unread
from .data import check_present, fetch
from .errors import KDError
from .stages import fit_bias_split
from .teachers import READS, check_same_data, load_model


def first_values(overrides):
    """The overrides with each sweep (a,b,c) cut to its first value; and, per swept key, the
    override line of each of its values (of a search's range, its two ends)."""
    single, sweeps = [], {}
    for o in continuation.overrides_parser().parse_overrides(overrides):
        if o.is_interval_sweep():  # a search's range: check its two ends
            values = [o.value().start, o.value().end]
        elif o.is_sweep_override():
            values = list(o.sweep_string_iterator())  # as typed: quotes, lists and groups compose again
        else:
            single.append(o.input_line)
            continue
        if not values:  # range(0), or glob() on a plain key or matching none of a group's options
            raise KDError(f"{o.input_line} gives no value to run" + (
                ": glob() picks among a config group's options (recipe=glob(pa*) picks recipe=paper)"
                if "glob(" in o.input_line else ""))
        sweeps[o.key_or_group] = [f"{o.get_key_element()}={v}" for v in values]
        single.append(sweeps[o.key_or_group][0])
    return single, sweeps


# keys that decide, beside the config groups, whether a job can run: the files it reads (_reads),
# and the checks that join two keys (config.check: bias_shift with fit_bias or an ensemble, a
# recipe with no T; unread.check_read_by_evaluate: data.val_size without fit_bias)
JOINED = ("data.root", "data.name", "data.download", "teacher", "generalist", "checkpoint", "fit_bias", "bias_shift",
          "data.val_size", "data.train_limit", "T", "device", "loss", "alpha", "teacher_combine", "combine",
          "optim.schedule", "optim.momentum_ramp_epochs", "data.elastic.scale")
REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # ${seed}: a key another value interpolates


def raw_value(cfg, key):
    """A value as written, interpolations unresolved (None where the key is absent)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()


def joined_keys(cfg, sweeps):
    """The swept keys whose every combination is a job preflight must build: config groups, JOINED,
    and the swept keys those interpolate (a teacher per seed: teacher=t/${seed}/checkpoint.pt). A
    sweep of seeds alone, or a search's ranges, joins nothing: one job stands for all."""
    written = [str(raw_value(cfg, k)) for k in JOINED] + [line for k in JOINED for line in sweeps.get(k, ())]
    referenced = set(REFERENCE.findall(" ".join(written)))
    return [k for k in sweeps if not k.startswith("hydra")
            and (k in cfg.hydra.runtime.choices or k in JOINED or k in referenced)]


# Hydra keys that only a job's launch sets (its number, id, folder name and folder): a value that
# reads one cannot be resolved before, so its files are checked by the stage when the job runs
AT_LAUNCH = re.compile(r"\$\{hydra:(job\.(num|id|override_dirname)|runtime\.output_dir)\}")


@contextlib.contextmanager
def hydra_resolver_set(cfg):
    """Values may use Hydra's resolver (teacher=${hydra:runtime.cwd}/t.pt,
    hydra.run.dir=${hydra:runtime.cwd}/runs/x), which reads the config Hydra sets while a job runs:
    set the composed one while preflight resolves values, as Hydra will, and put back what was."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    before = instance.cfg
    instance.set_config(cfg.copy())  # set_config makes the hydra node it is given read-only
    try:
        yield
    finally:
        instance.cfg = before


def resolving(job, hydra_values):
    """While a job's values are resolved: its own Hydra config where values read Hydra's
    (`teacher=t/${hydra:runtime.choices.recipe}/checkpoint.pt` differs by job)."""
    return hydra_resolver_set(job) if hydra_values else contextlib.nullcontext()


def _resolved(cfg, key):
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _reads(stage, job):
    """What of a job's config decides the files it reads and how they are checked, resolved (a
    path may interpolate ${seed}): jobs that agree on it read the same files."""
    keys = ["data.root", "data.name", "data.download", *(READS[stage][:1] if stage in READS else ()),
            *(("fit_bias", "data.val_size") if stage == "evaluate" else ())]
    return repr([_resolved(job, k) for k in keys])


def check_inputs(stage, cfg, loaded=None):
    """Before a job runs, the files it will read: the data set's (unless it may download them), and
    each checkpoint its stage reads (teachers.READS), loaded as the stage loads it: a finished kd
    model, trained on these data files, whose weights fit its architecture (and, for a bias fitted by
    kd evaluate, with a validation split to fit on). The stage checks again as it loads them;
    found here, the refusal leaves no failed run folder behind. loaded: {path: checkpoint record}
    of files already loaded, shared by a sweep's jobs."""
    loaded = {} if loaded is None else loaded
    # the files, fetched now where they may be (a failed download then leaves no run folder)
    fetch(cfg.data.root, cfg.data.name) if cfg.data.download else check_present(cfg.data.root, cfg.data.name)
    if stage in READS:
        key, resolve, _ = READS[stage]
        for path in resolve(cfg[key]):
            if path not in loaded:
                ckpt, _ = load_model(path, "cpu", cfg.data.name, key)
                loaded[path] = {k: v for k, v in ckpt.items() if k != "state_dict"}
            # a model that trains from this one must have learned from these files; one evaluated may
            # be counted on any test set (kd evaluate does not hold it to its data files)
            check_same_data(loaded[path], path, cfg.data.name, key, cfg.data.root if key != "checkpoint" else None)
            if stage == "evaluate" and cfg.fit_bias:
                fit_bias_split(cfg, loaded[path])


def check_jobs(stage, args, jobs, files, hydra_values=False, typed=None):
    """For each job's config: the checks that join two keys, and where `files`, what it reads
    (check_inputs, once for each distinct set of files, each checkpoint loaded once). typed: the
    keys the command sets (a search's searched keys among them) whose use is checked, a key inert
    in every job refused; None for a run or sweep that continues as it began."""
    seen, loaded, inert = set(), {}, None
    for job in jobs:
        with resolving(job, hydra_values):
            config.check(stage, job)
            if typed is not None:
                unread.check_recipe(stage, typed, job)
                here = unread.inert_keys(stage, typed, job)
                inert = here if inert is None else {k: why for k, why in inert.items() if k in here}
            if stage == "evaluate":
                unread.check_read_by_evaluate(args, job)
            reads = _reads(stage, job)
            if files and reads not in seen:
                seen.add(reads)
                check_inputs(stage, job, loaded)
    if inert:
        key, why = next(iter(sorted(inert.items())))
        raise KDError(f"{key} changes nothing here: {why}; drop it")
