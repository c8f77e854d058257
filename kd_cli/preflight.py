"""Before Hydra runs anything: compose the stage's config, check every value (every value of a
sweep, both ends of a search's ranges), and the folder it will write in. A typo'd key, a bad value
or another run's folder ends in one `kd: error:` line, with no folder made or changed."""
import contextlib
import itertools
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from . import config, continuation, provenance, run, unread
from .config import CONFIG_MODULE, typed_key
from .data import check_present, fetch
from .errors import KDError
from .stages import fit_bias_split
from .teachers import READS, check_same_data, load_model
from .unread import is_hydra_key


def _first_values(overrides):
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


def _composition_message(stage, e):
    text = " ".join(str(e).split())
    cause = " ".join(str(e.__cause__).split()) if e.__cause__ else ""
    for msg in (text, cause):
        if "Could not append" in msg and "already" in msg:  # +T=5: T is a key already
            key = msg.split("'")[1] if "'" in msg else msg
            return f"{key} is already a key of kd {stage}: set it without + ({key}=...)"
        if "not in struct" in msg or "Could not override" in msg or "Could not append" in msg:
            key = msg.split("'")[1] if "'" in msg else msg
            if key == "experiment":  # the presets switch to a student's recipe (recipe=paper)
                return (f"experiment= presets (conf/experiment/) are transfer sets for a student: kd distill or "
                        f"kd train-student; kd {stage} trains on all of them")
            return f"unknown key '{key}' for kd {stage}; `kd {stage} --cfg job` lists the keys"
        if "not in 'SamplerConfig'" in msg or "GridSampler" in msg:
            return f"hparams_search samplers: tpe (the default), random, cmaes; for a grid, kd {stage} -m key=a,b,c"
        if "hydra/sweeper/optuna" in msg or "hydra/sweeper/sampler" in msg:
            return "hparams_search needs Optuna: pip install 'kd-cli[optuna]'"
        if "hparams_search" in msg and "Could not find" in msg:
            names = ", ".join(SEARCHABLE)
            return f"no search space for kd {stage} there; hparams_search= one of: {names} (conf/hparams_search/)"
    if "override_grammar" in text:  # a parse error: most often a path or list needing quotes
        text += " (quote a value that holds = , [ or spaces: checkpoint=['a/0_seed=0/checkpoint.pt','b.pt'])"
    return text.split(" full_key:")[0]


PATH_KEYS = ("teacher", "generalist", "checkpoint", "resume", "hydra.run.dir", "hydra.sweep.dir")


def quote_paths(overrides):
    """A sweep job's folder name holds = and , (0_T=2,alpha=0.1), which Hydra's override grammar
    cannot read unquoted: quote a path value that holds '=' so `teacher=<job dir>/checkpoint.pt`
    just works. Lists and already quoted values are left as the user wrote them."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and typed_key(o) in PATH_KEYS and "=" in value and value[:1] not in "[('\"":
            o = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(o)
    return out


SEARCHABLE = ("train_teacher", "train_student", "distill")  # stages with conf/hparams_search/<name>.yaml


def check_search(stage, cfg, multirun, check_value):
    """A search (hparams_search=...) needs -m and a validation split to minimise, and every end
    of every range it searches must be a value kd accepts."""
    if not multirun:
        raise KDError(f"hparams_search runs a search of many runs: add -m (kd {stage} -m hparams_search=...)")
    if cfg.hydra.sweeper.n_jobs < 1 or str(cfg.hydra.sweeper.direction) not in ("minimize", "Direction.minimize"):
        raise KDError("a search runs n_jobs >= 1 trials at a time and minimises validation errors: "
                      "hydra.sweeper.n_jobs=1 (or more), hydra.sweeper.direction=minimize")
    if not cfg.data.val_size:
        raise KDError(SEARCH_NEEDS_VALIDATION)
    if str(OmegaConf.select(cfg, "hydra.sweeper.sampler._target_", default="")).endswith("GridSampler"):
        raise KDError(f"for a grid, use kd's own sweep: kd {stage} -m key=a,b,c (no hparams_search)")
    space = OmegaConf.to_container(cfg.hydra.sweeper.params or {})
    for key in space:
        if OmegaConf.select(cfg, key, default=None) is None and key not in cfg.hydra.runtime.choices:
            raise KDError(f"the search space has {key}, which kd {stage} does not; "
                          f"use hparams_search={stage.replace('-', '_')} or drop hydra.sweeper.params.{key}")
    fixed, ends = _first_values([f"{k}={v}" for k, v in space.items()])
    for line in fixed:  # a value the space fixes
        check_value(typed_key(line), [line])
    for key, lines in ends.items():
        check_value(key, lines)


def check_search_continuation(stage, cfg, task, compose_trial):
    """A search launched into a folder that holds one continues it, so it must be the same search:
    the same typed overrides, space and sampler (only hydra.sweeper.n_trials may grow), and each
    trial it ran must continue as it ran (continuation.check_job_continues: its config, code, data,
    teachers): a changed config file would otherwise make the study mix two objectives."""
    record = Path(cfg.hydra.sweep.dir) / "multirun.yaml"
    if not record.is_file():
        return
    try:
        then = OmegaConf.load(record).hydra
        same = {"overrides": sorted(continuation.recorded(then.overrides.task)) == sorted(task),
                "hydra.sweeper.params": then.sweeper.params == cfg.hydra.sweeper.params,
                "hydra.sweeper.sampler": then.sweeper.sampler == cfg.hydra.sweeper.sampler,
                "hydra.sweeper._target_": then.sweeper._target_ == cfg.hydra.sweeper._target_}
    except Exception:  # a damaged record, or a grid sweep's (no params): not a search to continue
        same = {"its multirun.yaml": False}
    changed = [k for k, ok in same.items() if not ok]
    if changed:
        raise KDError(f"{record.parent} holds another sweep or search ({', '.join(changed)} differ); continue it "
                      f"with kd {stage} resume={record.parent} (hydra.sweeper.n_trials=N may be added), or choose "
                      "a new hydra.sweep.dir")
    again = f"continue the search as it ran (kd {stage} resume={record.parent}), or choose a new hydra.sweep.dir"
    local = continuation.launches_here(cfg.hydra.launcher._target_)
    for trial in sorted(p for p in record.parent.glob("[0-9]*_*") if (p / run.RECORD).is_dir()):
        run.check_not_in_use(trial)
        continuation.check_job_continues(trial, compose_trial, settles_here=local, again=again, runs_here=local)


# conf/hydra/default.yaml's: the job's number first, so that no two jobs share a folder and a sweep
# finds each job's folder again by its number
DEFAULT_SUBDIR = "${hydra.job.num}_${hydra.job.override_dirname}"


def job_dirs(compose_job, jobs, sweep_dir):
    """Where each job of a sweep with a custom hydra.sweep.subdir will write: its subdir resolved
    as Hydra's launcher resolves it, with the job's number and override_dirname (composing the
    job sets that). Two jobs that would share a folder are refused: the second would take the
    first's finished run for its own."""
    dirs, first = [], {}
    for num, job in enumerate(jobs):
        cfg = compose_job(job)
        with open_dict(cfg):  # as Hydra's launcher sets them for job `num`
            cfg.hydra.job.num = num
            cfg.hydra.job.id = num
        with hydra_resolver_set(cfg):  # ${hydra:runtime.choices.model} reads the job's own
            folder = Path(sweep_dir) / str(cfg.hydra.sweep.subdir)
        if folder in first:
            a = first[folder]
            raise KDError(f"jobs {a} ({' '.join(jobs[a]) or 'no overrides'}) and {num} ({' '.join(job)}) would both "
                          f"write in {folder}: give a hydra.sweep.subdir that tells every job apart, e.g. one that "
                          f"begins with ${{hydra.job.num}}_ as kd's default ({DEFAULT_SUBDIR}) does")
        first[folder] = num
        dirs.append(folder)
    return dirs


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


# keys that decide, beside the config groups, whether a job can run: the files it reads (_reads),
# and the checks that join two keys (config.check: bias_shift with fit_bias or an ensemble, a
# recipe with no T; unread.check_read_by_evaluate: data.val_size without fit_bias)
JOINED = ("data.root", "data.name", "data.download", "teacher", "generalist", "checkpoint", "fit_bias", "bias_shift",
          "data.val_size", "data.train_limit", "T", "device", "loss", "alpha", "teacher_combine", "combine",
          "optim.schedule", "optim.momentum_ramp_epochs", "data.elastic.scale")
REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # ${seed}: a key another value interpolates


def _raw(cfg, key):
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
    written = [str(_raw(cfg, k)) for k in JOINED] + [line for k in JOINED for line in sweeps.get(k, ())]
    referenced = set(REFERENCE.findall(" ".join(written)))
    return [k for k in sweeps if not k.startswith("hydra")
            and (k in cfg.hydra.runtime.choices or k in JOINED or k in referenced)]


# Hydra keys that only a job's launch sets (its number, id, folder name and folder): a value that
# reads one cannot be resolved before, so its files are checked by the stage when the job runs
AT_LAUNCH = re.compile(r"\$\{hydra:(job\.(num|id|override_dirname)|runtime\.output_dir)\}")


def _resolving(job, hydra_values):
    """While a job's values are resolved: its own Hydra config where values read Hydra's
    (`teacher=t/${hydra:runtime.choices.recipe}/checkpoint.pt` differs by job)."""
    return hydra_resolver_set(job) if hydra_values else contextlib.nullcontext()


def check_jobs(stage, args, jobs, files, hydra_values=False, typed=None):
    """For each job's config: the checks that join two keys, and where `files`, what it reads
    (check_inputs, once for each distinct set of files, each checkpoint loaded once). typed: the
    keys the command sets (a search's searched keys among them) whose use is checked, a key inert
    in every job refused; None for a run or sweep that continues as it began."""
    seen, loaded, inert = set(), {}, None
    for job in jobs:
        with _resolving(job, hydra_values):
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


SEARCH_NEEDS_VALIDATION = ("a search minimises validation errors: set data.val_size (e.g. 10000); the test set is "
                           "never its objective")


def sweep_in(overrides):
    """The first override in the list that sweeps (T=2,5, seed=range(3), lr=interval(...)), as
    typed; None when there is none or the list does not parse (kd itself then says why)."""
    from hydra.errors import HydraException

    try:
        parsed = continuation.overrides_parser().parse_overrides(list(overrides))
    except HydraException:
        return None
    return next((o.input_line for o in parsed if o.is_sweep_override()), None)


def _needs_multirun(stage, args):
    """The refusal of a sweep typed without -m, naming its first swept key."""
    o = next(o for o in continuation.overrides_parser().parse_overrides(args) if o.is_sweep_override())
    if o.is_interval_sweep():
        return (f"{o.input_line} is a search range: it takes a search, kd {stage} -m "
                f"hparams_search={stage.replace('-', '_')} ... (conf/hparams_search/)")
    values = list(o.sweep_string_iterator())
    shown = ", ".join(values[:3]) + (", ..." if len(values) > 3 else "")
    return (f"{o.key_or_group} has {len(values)} values ({shown}): add -m to run a job for each (kd {stage} -m ...), "
            "or quote a value that holds a comma")


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


def check_overrides(stage, config_name, overrides):
    """Compose the stage's config before Hydra runs it and check every value (every value of a
    sweep too), and the folder it will write in: a typo'd key, a bad value or another run's
    folder ends in one line, with no folder made or changed."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    multirun = any(o in ("-m", "--multirun") for o in overrides)
    args = [o for o in overrides if o not in ("-m", "--multirun")]
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"), contextlib.ExitStack() as stack:
            single, sweeps = _first_values(args)
            cfg = compose(config_name, overrides=single, return_hydra_config=True)
            hydra_values = any("${hydra:" in o for o in args)  # kd's own configs never read Hydra's resolver
            if hydra_values:
                stack.enter_context(hydra_resolver_set(cfg))
            config.check(stage, cfg)
            search = run.is_search(cfg.hydra)
            # a run resumed, or a sweep continued, goes on as it began (begun, maybe, before a check
            # below existed): what it would ignore was settled when it started
            continuing = bool(cfg.get("resume")) or (multirun and (Path(cfg.hydra.sweep.dir) / "multirun.yaml").is_file())
            typed = None if continuing else \
                unread.typed_keys(args) | (set(cfg.hydra.sweeper.get("params") or {}) if search else set())
            if not continuing:
                unread.check_read_by_stage(stage, args, cfg, lambda added: compose(
                    config_name, overrides=[o for o in single if not (o.startswith("+") and typed_key(o) in added)],
                    return_hydra_config=True))
            if not multirun and sweeps and not search:  # Hydra's own message is a page long
                raise KDError(_needs_multirun(stage, args))

            composed = {(): cfg}  # the config for each choice of the swept config groups

            def job_with(lines):
                """The config of a job whose keys in `lines` take those values, the others their first:
                the values set on the config of the job's config-group choices (model=teacher), which
                is composed once for each such choice (75 ms)."""
                parsed = continuation.overrides_parser().parse_overrides(list(lines))
                groups = tuple(line for line, o in zip(lines, parsed) if o.key_or_group in cfg.hydra.runtime.choices)
                if groups not in composed:
                    keys = {typed_key(g) for g in groups}
                    composed[groups] = compose(config_name, return_hydra_config=True,
                                               overrides=[o for o in single if typed_key(o) not in keys] + list(groups))
                job = composed[groups].copy()
                with open_dict(job):
                    for line, o in zip(lines, parsed):
                        if line not in groups:
                            OmegaConf.update(job, o.key_or_group, o.value(), merge=False)
                return job

            def check_values(key, lines):
                if key.startswith("hydra"):
                    return  # Hydra's own key: refused below as a sweep, or checked by Hydra
                for line in lines:
                    job = job_with([line])
                    with _resolving(job, hydra_values):
                        config.check(stage, job)
                    if search and not job.data.val_size:
                        raise KDError(SEARCH_NEEDS_VALIDATION)

            for key, values in sweeps.items():
                check_values(key, values)
            sweeper = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))
            if sweeper.endswith(".OptunaSweeper"):  # Hydra's own: no objective kd returns, no continuation
                raise KDError(f"search with hparams_search={config_name if config_name in SEARCHABLE else '<stage>'}"
                              " (Hydra's Optuna sweeper, made resumable, minimising validation errors; "
                              "conf/hparams_search/) rather than hydra/sweeper=optuna")
            if multirun and any(is_hydra_key(o) and typed_key(o) in sweeps for o in args):
                raise KDError("Hydra cannot sweep its own keys; give a search range on the key itself: "
                              "'T=tag(log, interval(2.0, 20.0))'")
            if search:
                check_search(stage, cfg, multirun, check_values)
                check_search_continuation(stage, cfg, [o for o in args if not is_hydra_key(o)],
                                          lambda trial: compose(config_name, overrides=trial))
            jobs_left = True
            if multirun:
                if "${hydra:" in str(_raw(cfg, "hydra.sweep.dir")):  # Hydra's issue 2247, fixed after 1.3
                    raise KDError("hydra.sweep.dir cannot use ${hydra:...}: Hydra 1.3 reads a sweep's folder before "
                                  "it sets its config. Give the path itself; a relative one is relative to the "
                                  "folder kd runs in (hydra.sweep.dir=runs/x)")
                run.check_writable(cfg.hydra.sweep.dir)
                custom_subdir = _raw(cfg, "hydra.sweep.subdir") != DEFAULT_SUBDIR
                if custom_subdir and search:
                    raise KDError("a search names its trials' folders <trial>_<parameters> and continues them by "
                                  "those names: drop hydra.sweep.subdir")
                if cfg.hydra.sweeper._target_.endswith("BasicSweeper"):
                    jobs = continuation.sweep_jobs(o for o in args if not is_hydra_key(o))
                    hydra_args = [o for o in args if is_hydra_key(o)]
                    folders = job_dirs(lambda job: compose(config_name, overrides=[*hydra_args, *job],
                                                           return_hydra_config=True),
                                       jobs, cfg.hydra.sweep.dir) if custom_subdir else None
                    jobs_left = continuation.check_sweep_continuation(stage, cfg.hydra.sweep.dir, jobs,
                                                             lambda job: compose(config_name, overrides=job),
                                                             launcher=str(cfg.hydra.launcher._target_),
                                                             job_folders=folders)
            else:
                run.check_writable(cfg.hydra.run.dir)
                if cfg.get("resume"):
                    resumed = compose(config_name, overrides=single)
                    # the code first: a kd that adds a key also changes the config it composes, and
                    # "a config file changed" would name the symptom, not the cause
                    provenance.check_resume(cfg.resume, resumed)
                    continuation.check_resume_config(cfg.resume, OmegaConf.to_container(resumed))
                else:
                    run.check_new_run_folder(Path(cfg.hydra.run.dir), stage)
            # what the jobs will read, in every combination a sweep gives it: unless a finished sweep
            # reads nothing (its files may have moved since), a resumed run reads what it recorded
            # (provenance.check_resume), a cluster's nodes read their own files, or a path names
            # what only the job's launch sets (${hydra:job.num})
            here = not multirun or continuation.launches_here(cfg.hydra.launcher._target_)
            joined = [sweeps[k] for k in joined_keys(cfg, sweeps)]
            at_launch = any(AT_LAUNCH.search(o) for o in args)
            check_jobs(stage, args, (job_with(lines) for lines in itertools.product(*joined)),
                       files=jobs_left and here and not cfg.get("resume") and not at_launch, hydra_values=hydra_values,
                       typed=typed)
    except KDError:
        raise
    except Exception as e:  # Hydra's composition and parse errors have no common base
        raise KDError(_composition_message(stage, e)) from None
