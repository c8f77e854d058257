"""`kd` end to end (in-process, as the console script runs it) on tiny synthetic data."""
import json
import shutil

import pytest
import torch

from kd_cli.checkpoint import load_checkpoint, save_checkpoint, sha256_of
from kd_cli.errors import KDError
from kd_cli.models import build_mlp

FAST = ["epochs=2", "batch_size=50", "model.hidden=[16]"]  # the default widths: tests/test_config.py
METRIC_KEYS = {"stage", "test_errors", "test_total", "test_error_rate", "per_class_errors", "epochs",
               "train_images", "train_seconds", "wall_seconds", "seed"}


def run_dirs(cwd, stage):
    return sorted((cwd / "outputs" / stage).iterdir())


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def last_line(proc):
    return proc.stdout.strip().splitlines()[-1]


def test_four_stages_end_to_end(kd):
    teacher = kd("train-teacher", *FAST)
    (t_dir,) = run_dirs(kd.cwd, "train-teacher")
    t = metrics_of(t_dir)
    assert METRIC_KEYS <= t.keys() and t["stage"] == "train-teacher"
    assert last_line(teacher) == f"test errors: {t['test_errors']} / 200"
    assert isinstance(t["test_errors"], int) and t["test_total"] == 200 and t["train_images"] == 600
    assert sum(t["per_class_errors"]) == t["test_errors"] and [h["epoch"] for h in t["history"]] == [0, 1, 2]
    assert (t_dir / ".hydra" / "config.yaml").is_file() and (t_dir / ".hydra" / "overrides.yaml").is_file()
    ckpt = torch.load(t_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["arch"]["hidden"] == [16] and ckpt["arch"]["dropout_input"] == 0.2 and ckpt["config"]["data"]["jitter"] == 2

    kd("train-student", "data.val_size=100", *FAST)
    (s_dir,) = run_dirs(kd.cwd, "train-student")
    s = metrics_of(s_dir)
    assert s["arch"]["dropout_input"] == 0 and s["train_images"] == 500 and s["val_size"] == 100
    assert 0 <= s["val_errors"] <= 100 and all("val_errors" in row for row in s["history"])

    distilled = kd("distill", "T=5", "alpha=0.3", *FAST)  # no teacher given: the newest one
    (d_dir,) = run_dirs(kd.cwd, "distill")
    d = metrics_of(d_dir)
    assert d["T"] == 5 and d["alpha"] == 0.3
    assert d["teacher"]["path"] == str((t_dir / "checkpoint.pt").resolve())
    assert f"teacher={(t_dir / 'checkpoint.pt').resolve()} (the newest" in distilled.stderr  # said, not only recorded
    refused = kd("distill", "T=0", *FAST, check=False)  # ...but only by a command that runs: a refusal is one line
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [refused.stderr.strip()], refused.stderr
    assert refused.stderr.startswith("kd: error:") and "T" in refused.stderr
    assert d["teacher"]["sha256"] == sha256_of(t_dir / "checkpoint.pt")
    assert torch.load(d_dir / "checkpoint.pt", weights_only=True)["teacher"]["sha256"] == d["teacher"]["sha256"]
    assert last_line(distilled) == f"test errors: {d['test_errors']} / 200"

    kd("distill", "data.jitter=1", "epochs=1", "model.hidden=[16]")  # augmented transfer set: the teacher runs per batch
    assert metrics_of(run_dirs(kd.cwd, "distill")[-1])["teacher"]["sha256"] == d["teacher"]["sha256"]

    evaluated = kd("evaluate", f"checkpoint={d_dir / 'checkpoint.pt'}")
    (e_dir,) = run_dirs(kd.cwd, "evaluate")
    e = metrics_of(e_dir)
    assert e["test_errors"] == d["test_errors"] and e["per_class_errors"] == d["per_class_errors"]
    assert last_line(evaluated) == f"test errors: {d['test_errors']} / 200"


def test_same_seed_gives_same_errors_and_weights(kd):
    for _ in range(2):
        kd("train-student", "seed=3", "data.train_limit=300", *FAST)
    a, b = run_dirs(kd.cwd, "train-student")
    assert a != b  # two runs, two folders
    assert metrics_of(a)["test_errors"] == metrics_of(b)["test_errors"]
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_multirun_writes_one_folder_per_job(kd):
    kd("train-teacher", "model.hidden=[32]", "epochs=1")
    (t_dir,) = run_dirs(kd.cwd, "train-teacher")
    kd("distill", "-m", "T=2,5", "alpha=0.1,0.5", "epochs=1", f"teacher={t_dir / 'checkpoint.pt'}")
    (sweep,) = run_dirs(kd.cwd, "distill-sweep")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 4 and len({p.name for p in jobs}) == 4
    got = set()
    for job in jobs:
        m = metrics_of(job)
        assert (job / "checkpoint.pt").is_file() and f"T={m['T']:g}" in job.name
        got.add((m["T"], m["alpha"]))
    assert got == {(2.0, 0.1), (2.0, 0.5), (5.0, 0.1), (5.0, 0.5)}


@pytest.fixture
def bad_teachers(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"stage": "train-teacher", "arch": {"hidden": [4]}, "state_dict": {}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    text = tmp_path / "config.yaml"  # a file torch's reader fails on with an IndexError
    text.write_bytes(b"epochs: 3\n")
    usable = tmp_path / "usable.pt"
    tiny_teacher(usable)
    return {"garbage": garbage, "truncated": truncated, "foreign": foreign, "text": text, "usable": usable}


def tiny_teacher(path):
    """A usable teacher checkpoint that records no data files (pretrained may record other ones than a test's)."""
    arch = {"in_features": 784, "hidden": [4], "out_features": 10}
    save_checkpoint(path, {"stage": "train-teacher", "arch": arch, "state_dict": build_mlp(arch).state_dict()})


@pytest.mark.parametrize("args, says", [
    (["distill", "T=0"], "T must be a number in [0.01, 1000]"),
    (["distill", "T=-1"], "T must be a number in [0.01, 1000]"),
    (["distill", "T=abc"], "T must be a number in [0.01, 1000]"),
    (["distill", "alpha=1.5"], "alpha must be a number in [0, 1]"),
    (["distill", "alpha=-0.1"], "alpha must be a number in [0, 1]"),
    (["distill", "-m", "T=2,0"], "T must be a number in [0.01, 1000]"),
    (["distill", "temprature=3"], "unknown key 'temprature'"),
    (["train-student", "+lr_decay=0.5"], "unknown key 'lr_decay' for kd train-student (added with +: nothing reads it); did you mean optim.lr_decay?"),
    (["train-student", "++optim.lr_dcay=0.5"], "unknown key 'optim.lr_dcay'"),
    (["distill", "+data.elastic.scal=3"], "unknown key 'data.elastic.scal'"),
    (["distill", "+T=5"], "T is already a key of kd distill: set it without +"),
    (["distill", "-m", "+T=2,5"], "T is already a key of kd distill: set it without +"),
    (["distill", "--cfg", "job", "T=2,5"], "--cfg shows one job: T=2,5 sweeps"),
    (["train-teacher", "epochs=0"], "epochs must be an integer >= 1"),
    (["distill", "teacher=/no/such/file.pt"], "teacher checkpoint not found"),
    (["distill", "teacher={garbage}"], "is not a kd checkpoint"),
    (["distill", "teacher={truncated}"], "truncated"),
    (["distill", "teacher={foreign}"], "is not a kd checkpoint (missing"),
    (["distill", "teacher={text}"], "is not a readable kd checkpoint"),
    (["evaluate", "checkpoint={text}"], "is not a readable kd checkpoint"),
    (["distill"], "run `kd train-teacher` first"),
    (["train-student", "data.root={empty}", "data.download=false"], "KD_DATA_ROOT"),
    (["evaluate"], "needs checkpoint="),
    (["evaluate", "checkpoint=/no/such/file.pt"], "checkpoint not found"),
    (["evaluate", "checkpoint=[pretrained,pretrained]", "bias_shift={{3:3.5}}"], "take one checkpoint, not an ensemble"),
    (["train-specialists", "generalist=/no/such/file.pt"], "generalist checkpoint not found"),
    (["train-specialists", "generalist={garbage}"], "is not a kd checkpoint"),
    (["distill", "-m", "teacher={usable},/no/such/file.pt"], "teacher checkpoint not found"),
    (["evaluate", "checkpoint=pretrained", "data.val_size=10000"], "reads data.val_size only with fit_bias"),
    (["evaluate", "checkpoint=pretrained", "fit_bias=[3]"], "fit_bias fits on a validation split"),
    (["evaluate", "checkpoint=pretrained", "data.jitter=2"], "kd evaluate does not read data.jitter"),
    (["evaluate", "checkpoint=pretrained", "precision=bf16"], "kd evaluate does not read precision"),
    (["evaluate", "checkpoint=pretrained", "eval_every=5"], "kd evaluate does not read eval_every"),
    (["evaluate", "checkpoint=pretrained", "sgd_update=foreach"], "kd evaluate does not read sgd_update"),
])
def test_bad_input_is_one_line_and_no_checkpoint(kd, bad_teachers, tmp_path, args, says):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", **bad_teachers) for a in args]
    proc = kd(*args, "seed=0", check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kd: error: ") and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("outputs/*/*")), "refused before a run folder was made"


def test_help_and_unknown_stage(kd):
    out = kd("--help").stdout
    assert all(stage in out for stage in ("train-teacher", "train-student", "distill", "evaluate"))
    assert kd().stdout == out
    help_ = kd("distill", "--help").stdout
    assert "kd distill" in help_ and "alpha: 0.1" in help_ and "T: 5.0" in help_ and "recipe=paper" in help_
    job = kd("distill", "--cfg", "job", "T=3").stdout
    assert "T: 3" in job and "hidden:" in job
    proc = kd("distil", check=False)
    assert proc.returncode == 2 and "distill" in proc.stderr and "unknown stage" in proc.stderr


def test_paths_from_sweep_folders_are_quoted_for_hydra():
    from kd_cli.preflight import quote_paths

    job = "outputs/distill-sweep/s/0_T=2,alpha=0.1/checkpoint.pt"
    assert quote_paths([f"teacher={job}", f"resume={job}", "T=2,5", "teacher=a.pt,b.pt"]) == [
        f"teacher='{job}'", f"resume='{job}'", "T=2,5", "teacher=a.pt,b.pt"]  # a plain sweep stays one
    assert quote_paths([f"checkpoint=['{job}']", f"teacher='{job}'"]) == [f"checkpoint=['{job}']", f"teacher='{job}'"]


def test_paths_may_use_hydras_resolver_as_in_any_hydra_app(kd, tmp_path):
    """${hydra:runtime.cwd} resolves only where Hydra has set its config; preflight resolves paths
    before Hydra runs, and refused every such value ("HydraConfig was not set")."""
    kd("train-teacher", "model.hidden=[16]", "epochs=1", "hydra.run.dir=t")
    cwd = "${hydra:runtime.cwd}"
    kd("distill", f"teacher={cwd}/t/checkpoint.pt", f"hydra.run.dir={cwd}/runs/one", *FAST)
    assert metrics_of(tmp_path / "runs" / "one")["teacher"]["path"] == str(tmp_path / "t" / "checkpoint.pt")
    kd("distill", "-m", f"teacher={cwd}/t/checkpoint.pt", "T=2,5", "hydra.sweep.dir=runs/sweep", *FAST)
    assert len(list((tmp_path / "runs" / "sweep").glob("*/metrics.json"))) == 2
    # its record keeps the value as typed: the report and resume= read it without resolving it
    shutil.rmtree(sorted((tmp_path / "runs" / "sweep").glob("1_*"))[0])
    from kd_cli.report import report

    text = report([tmp_path / "runs" / "sweep"])
    assert "| not started |" in text and "`teacher=${hydra:runtime.cwd}/t/checkpoint.pt`" in text, text  # as typed
    kd("distill", "resume=runs/sweep")
    assert len(list((tmp_path / "runs" / "sweep").glob("*/metrics.json"))) == 2
    # except in the sweep's own folder, which Hydra 1.3 reads before it sets its config (a traceback)
    proc = kd("distill", "-m", "T=2,5", f"hydra.sweep.dir={cwd}/runs/other", *FAST, check=False)
    assert proc.returncode == 2 and "hydra.sweep.dir cannot use ${hydra:" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs" / "other").exists()
    # each job resolved with its own Hydra config: the paper recipe's teacher is missing, refused up front
    kd("train-teacher", "model.hidden=[16]", "epochs=1", "hydra.run.dir=by-recipe/distill")
    proc = kd("distill", "-m", "recipe=distill,paper", "teacher=by-recipe/${hydra:runtime.choices.recipe}/checkpoint.pt",
              "hydra.sweep.dir=by-recipe-sweep", *FAST, check=False)
    assert proc.returncode == 2 and "not found: by-recipe/paper/checkpoint.pt" in proc.stderr, proc.stderr
    assert not (tmp_path / "by-recipe-sweep").exists()
    # what only a job's launch sets (its number) is not resolved before it: the job checks its files
    kd("train-teacher", "model.hidden=[16]", "epochs=1", "hydra.run.dir=t1")
    shutil.copytree(tmp_path / "t", tmp_path / "t0")
    kd("distill", "-m", "T=2,5", "teacher=t${hydra:job.num}/checkpoint.pt", "hydra.sweep.dir=by-num", *FAST)
    assert sorted(metrics_of(j)["teacher"]["path"] for j in (tmp_path / "by-num").glob("*_T=*")) == [
        str(tmp_path / "t0" / "checkpoint.pt"), str(tmp_path / "t1" / "checkpoint.pt")]
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    proc = kd("distill", f"teacher={cwd}/missing.pt", *FAST, check=False)  # resolved, then checked
    assert proc.returncode == 2 and f"not found: {tmp_path / 'missing.pt'}" in proc.stderr, proc.stderr
    assert HydraConfig.instance().cfg is before  # preflight puts back the config it found


def test_kd_evaluate_takes_a_runs_folder_as_teacher_does_and_says_what_a_sweeps_holds(kd, tmp_path):
    kd("train-student", "model.hidden=[16]", "epochs=1", "hydra.run.dir=s")
    kd("evaluate", "checkpoint=s", "hydra.run.dir=e")
    assert metrics_of(tmp_path / "e")["test_errors"] == metrics_of(tmp_path / "s")["test_errors"]
    assert metrics_of(tmp_path / "e")["checkpoint_files"][0]["path"].endswith("s/checkpoint.pt")
    kd("train-student", "-m", "model.hidden=[16]", "epochs=1", "seed=0,1", "hydra.sweep.dir=sw")
    proc = kd("evaluate", "checkpoint=sw", check=False)  # one ensemble, or each job? not a guess
    assert proc.returncode == 2 and "no checkpoint.pt in the folder sw; its 2 job(s) have one each" in proc.stderr
    kd("evaluate", "checkpoint=[s,'sw/0_epochs=1,model.hidden=[16],seed=0']", "hydra.run.dir=both")  # a list of folders
    assert [f["path"] for f in metrics_of(tmp_path / "both")["checkpoint_files"]] == [
        str(tmp_path / "s" / "checkpoint.pt"), str(tmp_path / "sw" / "0_epochs=1,model.hidden=[16],seed=0" / "checkpoint.pt")]
    (tmp_path / "empty").mkdir()
    proc = kd("evaluate", "checkpoint=empty", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "kd: error: no checkpoint.pt in the folder empty"


# ---- what a job will read is checked in every combination a sweep gives it ---------------------

def outputs_made(cwd):
    return sorted((cwd / "outputs").glob("*/*")) if (cwd / "outputs").exists() else []


def test_every_value_of_a_swept_data_key_is_checked_before_any_folder_is_made(kd, tmp_path):
    """A sweep's later values read other files than its first: each job's are checked, whatever
    the order the values come in."""
    (tmp_path / "empty").mkdir()
    for roots in ((kd.root, tmp_path / "empty"), (tmp_path / "empty", kd.root)):
        proc = kd("train-student", "-m", f"data.root={roots[0]},{roots[1]}", "data.download=false", "epochs=1",
                  check=False)
        assert proc.returncode == 2 and "MNIST not found" in proc.stderr, proc.stderr
    # a teacher trained on MNIST, swept over a data set it was not trained on
    both = tmp_path / "both"
    shutil.copytree(kd.root / "MNIST", both / "MNIST")
    shutil.copytree(kd.root / "MNIST", both / "FashionMNIST")
    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"data.root={both}", f"hydra.run.dir={tmp_path / 't'}")
    for names in ("mnist,fashion_mnist", "fashion_mnist,mnist"):
        proc = kd("distill", "-m", f"data.name={names}", f"data.root={both}", f"teacher={tmp_path / 't' / 'checkpoint.pt'}",
                  "epochs=1", check=False)
        assert proc.returncode == 2 and "was trained on mnist" in proc.stderr, proc.stderr
    assert outputs_made(tmp_path) == []



def test_a_model_trained_on_other_files_of_the_data_set_is_refused_before_any_folder_is_made(kd, tmp_path):
    """A teacher (or a generalist) trained on other files under the same data.name, here one
    training label changed, is refused: what the student learns from it would come from other
    images or labels than the run's. The same bytes at another path pass; kd evaluate may count a
    checkpoint on other files (another test set: tests/test_transfer.py)."""
    from kd_cli.teachers import load_model, load_teacher

    kd("train-teacher", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 't'}")
    teacher = tmp_path / "t" / "checkpoint.pt"
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(kd.root, same)
    shutil.copytree(kd.root, other)
    labels = other / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8] = (raw[8] + 1) % 10  # the first image's label (after the 8-byte idx header)
    labels.write_bytes(bytes(raw))
    for args in (("distill", f"teacher={teacher}"), ("train-specialists", f"generalist={teacher}", "clusters=2")):
        proc = kd(*args, "epochs=1", f"data.root={other}", check=False)
        assert proc.returncode == 2 and "was trained on other mnist training files than those under" in proc.stderr, \
            proc.stderr
        assert proc.stderr.count("kd: error:") == 1
    for roots in (f"{same},{other}", f"{other},{same}"):  # each job of a sweep, whatever the order
        proc = kd("distill", "-m", f"teacher={teacher}", "epochs=1", f"data.root={roots}", check=False)
        assert proc.returncode == 2 and "other mnist training files" in proc.stderr, proc.stderr
    assert outputs_made(tmp_path) == []
    kd("distill", f"teacher={teacher}", "epochs=1", f"data.root={same}", f"hydra.run.dir={tmp_path / 'd'}")
    kd("evaluate", f"checkpoint={teacher}", f"data.root={other}", f"hydra.run.dir={tmp_path / 'e'}")
    # another test set beside the same training files: the teacher trained on the same images
    test_set = tmp_path / "test-set"
    shutil.copytree(kd.root, test_set)
    test_labels = test_set / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw = bytearray(test_labels.read_bytes())
    raw[8] = (raw[8] + 1) % 10
    test_labels.write_bytes(bytes(raw))
    kd("distill", f"teacher={teacher}", "epochs=1", f"data.root={test_set}", f"hydra.run.dir={tmp_path / 'd2'}")
    # a teacher that recorded all four files only (before kd kept the training files' record) is
    # held to all four: a root with another test set is refused, the same files pass
    ckpt = load_checkpoint(teacher)
    del ckpt["metrics"]["train_data_sha256"]
    older = tmp_path / "older.pt"
    save_checkpoint(older, {k: v for k, v in ckpt.items() if k != "format_version"})
    with pytest.raises(KDError, match="other mnist files .its run recorded all four"):
        load_model(older, "cpu", "mnist", data_root=test_set)
    load_model(older, "cpu", "mnist", data_root=same)
    # the stages check as they load, too (a path preflight did not see, such as a script's)
    with pytest.raises(KDError, match="other mnist training files"):
        load_teacher(teacher, "cpu", 784, 10, "mnist", other)
    with pytest.raises(KDError, match="generalist .* other mnist training files"):
        load_teacher(teacher, "cpu", 784, 10, "mnist", other, role="generalist")
    with pytest.raises(KDError, match="other mnist training files"):
        load_model(teacher, "cpu", "mnist", data_root=other)
    load_model(teacher, "cpu", "mnist", data_root=same)


def test_config_group_and_quoted_values_sweep_as_hydra_composes_them(kd, tmp_path):
    """A sweep over a config group (model=student,teacher) or over quoted paths (job folders hold
    = and ,) is checked value by value as each job will compose it, not refused as a strange key."""
    sweep = tmp_path / "models"
    kd("train-student", "-m", "model=student,teacher", "model.hidden=[16]", "epochs=1", f"hydra.sweep.dir={sweep}")
    checkpoints = sorted(sweep.glob("*/checkpoint.pt"))
    assert len(checkpoints) == 2 and all("=" in str(c) for c in checkpoints)
    proc = kd("train-student", "-m", "model=student,nosuchmodel", "epochs=1", check=False)
    assert proc.returncode == 2 and "nosuchmodel" in proc.stderr
    quoted = ",".join(f"'{c}'" for c in checkpoints)
    kd("evaluate", "-m", f"checkpoint={quoted}", f"hydra.sweep.dir={tmp_path / 'counted'}")
    assert len(list((tmp_path / "counted").glob("*/metrics.json"))) == 2


def test_a_fit_bias_with_no_split_to_fit_on_is_refused_before_any_folder_is_made(kd, tmp_path):
    kd("train-student", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 's'}")
    proc = kd("evaluate", f"checkpoint={tmp_path / 's' / 'checkpoint.pt'}", "fit_bias=[3]", check=False)
    assert proc.returncode == 2 and "fit_bias fits on a validation split" in proc.stderr, proc.stderr
    assert outputs_made(tmp_path) == []


def test_jobs_a_cluster_runs_read_their_files_there_and_are_not_checked_here(tiny_root, monkeypatch):
    from kd_cli.preflight import check_overrides

    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    args = ["-m", "T=1,2", "teacher=/only/on/the/cluster.pt", "hydra.sweep.dir=/tmp/kd-never-made"]
    check_overrides("distill", "distill", [*args, "hydra/launcher=submitit_slurm"])  # no error
    with pytest.raises(KDError, match="teacher checkpoint not found"):
        check_overrides("distill", "distill", [*args, "hydra/launcher=submitit_local"])


def test_a_swept_key_a_path_interpolates_and_a_swept_fit_bias_are_checked_for_every_job(kd, tmp_path):
    kd("train-student", "model.hidden=[16]", "epochs=1", f"hydra.run.dir={tmp_path / 'by-seed' / '0'}")
    per_seed = f"checkpoint={tmp_path / 'by-seed'}/${{seed}}/checkpoint.pt"  # only seed 0's exists
    for seeds in ("0,1", "1,0"):
        proc = kd("evaluate", "-m", f"seed={seeds}", per_seed, check=False)
        assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and "by-seed/1/" in proc.stderr
    for args in (["fit_bias=[],[3]"], ["fit_bias=[3]", "data.val_size=100,0"]):  # trained with no split
        proc = kd("evaluate", "-m", f"checkpoint={tmp_path / 'by-seed' / '0' / 'checkpoint.pt'}", *args, check=False)
        assert proc.returncode == 2 and "fit_bias fits on a validation split" in proc.stderr, proc.stderr
    assert outputs_made(tmp_path) == []


def test_each_checkpoint_is_loaded_once_however_many_jobs_read_it(tiny_root, monkeypatch, tmp_path):
    from kd_cli import job_checks, preflight

    teacher = tmp_path / "teacher.pt"
    tiny_teacher(teacher)
    loads = []
    real = job_checks.load_model
    monkeypatch.setattr(job_checks, "load_model", lambda path, *a: loads.append(path) or real(path, *a))
    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    preflight.check_overrides("distill", "distill", ["-m", "seed=0,1,2", "T=2,4", f"data.root={tiny_root},{tiny_root}/.",
                                                     f"teacher={teacher}", f"hydra.sweep.dir={tmp_path / 'never'}"])
    assert len(loads) == 1


def one_line_refusal(proc, says):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("kd: error: ") and says in lines[0], proc.stderr
    return lines[0]


def test_several_values_without_m_and_help_with_m(kd):
    one_line_refusal(kd("distill", "T=2,5", check=False), "T has 2 values (2, 5): add -m")
    line = one_line_refusal(kd("distill", "seed=range(0,1500)", check=False), "seed has 1500 values (0, 1, 2, ...)")
    assert len(line) < 200
    one_line_refusal(kd("distill", "T=interval(2,5)", check=False), "is a search range")
    assert "kd distill" in kd("distill", "-m", "--help").stdout  # help shows, -m or not
    for flag in (["--cfg", "job"], ["--info"], ["--shell-completion"], ["--cfg", "job", "--resolve"]):
        one_line_refusal(kd("distill", "-m", *flag, check=False), "drop -m")


def test_values_that_join_two_keys_are_checked_in_every_combination_a_sweep_makes(kd, tmp_path):
    """Each value is fine alone; some jobs of the sweep would combine two that a run refuses."""
    kd("train-student", "model.hidden=[16]", "epochs=1", "data.val_size=100", f"hydra.run.dir={tmp_path / 'a'}")
    a = tmp_path / "a" / "checkpoint.pt"
    for args, says in ((["fit_bias=[],[3]", "bias_shift=null,{3:1}"], "not both"),
                       ([f"checkpoint=[{a}],[{a},{a}]", "fit_bias=[],[3]"], "not an ensemble"),
                       (["fit_bias=[3],[]", "data.val_size=100"], "reads data.val_size only with fit_bias"),
                       (["fit_bias=[],[3]", "data.val_size=100"], "reads data.val_size only with fit_bias")):
        checkpoint = [] if any(x.startswith("checkpoint=") for x in args) else [f"checkpoint={a}"]
        one_line_refusal(kd("evaluate", "-m", *checkpoint, *args, check=False), says)
    assert outputs_made(tmp_path) == []


def test_only_keys_that_decide_whether_a_job_can_run_multiply_the_jobs_preflight_builds(tiny_root, monkeypatch):
    from hydra import compose, initialize_config_module

    from kd_cli.config import CONFIG_MODULE
    from kd_cli.job_checks import first_values, joined_keys

    monkeypatch.setenv("KD_DATA_ROOT", str(tiny_root))
    args = ["seed=range(0,100)", "lr=0.01,0.1", "T=2,5", "model=student,teacher", "teacher=t/${seed}/checkpoint.pt",
            "epochs=1,2"]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        def joined(args):
            single, sweeps = first_values(args)
            return sorted(joined_keys(compose("distill", overrides=single, return_hydra_config=True), sweeps))

        assert joined(args) == ["T", "model", "seed"]  # seed: the teacher's path names it
        assert joined(args[:3] + args[4:]) == ["T", "seed"]
        assert joined(["seed=range(0,100)", "lr=0.01,0.1", "teacher=t/checkpoint.pt"]) == []  # one job stands for all
