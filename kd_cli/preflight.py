"""Before Hydra runs anything: compose the stage's config, check every value (every value of a
sweep, both ends of a search's ranges), and the folder it will write in. A typo'd key, a bad value
or another run's folder ends in one `kd: error:` line, with no folder made or changed."""
import contextlib
import itertools
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from . import config, continuation, provenance, run, unread
from .config import CONFIG_MODULE, typed_key
from .errors import KDError
from .job_checks import AT_LAUNCH, check_jobs, first_values, hydra_resolver_set, joined_keys, raw_value, resolving
from .search_checks import SEARCH_NEEDS_VALIDATION, SEARCHABLE, check_search, check_search_continuation
from .unread import is_hydra_key


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
            single, sweeps = first_values(args)
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
                    with resolving(job, hydra_values):
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
                if "${hydra:" in str(raw_value(cfg, "hydra.sweep.dir")):  # Hydra's issue 2247, fixed after 1.3
                    raise KDError("hydra.sweep.dir cannot use ${hydra:...}: Hydra 1.3 reads a sweep's folder before "
                                  "it sets its config. Give the path itself; a relative one is relative to the "
                                  "folder kd runs in (hydra.sweep.dir=runs/x)")
                run.check_writable(cfg.hydra.sweep.dir)
                custom_subdir = raw_value(cfg, "hydra.sweep.subdir") != DEFAULT_SUBDIR
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
