"""hparams_search: an Optuna study through Hydra, minimising validation errors, stored in the sweep
folder, continued by the same command after a stop, with failed trials recorded."""
import json

import pytest

from kd_cli.run import ERROR, METRICS
from kd_cli.search import optuna  # after kd_cli.search has quieted SQLAlchemy 1.4's 2.0 warning

SEARCH = ["train-student", "-m", "hparams_search=train_student", "model.hidden=[16]", "data.val_size=100",
          "hydra.sweeper.n_trials=4", "epochs=choice(2,3)", "batch_size=choice(50,100)"]


def study_of(sweep):
    return optuna.load_study(study_name="train-student", storage=f"sqlite:///{sweep}/optuna.db")


def trial_folder(sweep, number):
    (folder,) = sweep.glob(f"{number}_*")
    return folder


def metrics(folder):
    return json.loads((folder / METRICS).read_text())


def test_a_stopped_search_continues_with_the_same_command_as_if_never_stopped(kd, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    kd(*SEARCH, f"hydra.sweep.dir={whole}")
    stop = {"KD_TEST_SIGNAL_AT": "SIGTERM@2:1"}  # in trial 0's second epoch: ends the whole search
    proc = kd(*SEARCH, f"hydra.sweep.dir={broken}", extra_env=stop, check=False)
    assert proc.returncode == 143 and "state saved" in proc.stderr, proc.stderr
    assert [t.state for t in study_of(broken).trials] == [optuna.trial.TrialState.RUNNING]
    assert (trial_folder(broken, 0) / "state.pt").exists()

    kd(*SEARCH, f"hydra.sweep.dir={broken}")  # the same command: trial 0 resumes, 1-3 run, no more

    done, redone = study_of(whole).trials, study_of(broken).trials
    assert [t.state for t in redone] == [optuna.trial.TrialState.COMPLETE] * 4
    assert [t.params for t in redone] == [t.params for t in done]  # proposed as if never stopped
    assert [t.value for t in redone] == [t.value for t in done]
    for t in redone:  # trial k ran in folder k with the trial's own parameters, resumed to the same result
        folder = trial_folder(broken, t.number)
        assert all(f"{k}={v}" in folder.name for k, v in t.params.items())
        assert metrics(folder)["val_errors"] == t.value
        assert metrics(folder)["history"] == metrics(trial_folder(whole, t.number))["history"]
    assert sorted(p.name.split("_")[0] for p in broken.glob("[0-9]*_*")) == ["0", "1", "2", "3"]
    again = kd(*SEARCH, f"hydra.sweep.dir={broken}")  # a finished search: nothing left to run
    assert "Launching" not in again.stdout + again.stderr and len(study_of(broken).trials) == 4
    study_file = (broken / "optuna.db").read_bytes()
    other = kd(*SEARCH[:-1], "batch_size=choice(50,200)", f"hydra.sweep.dir={broken}", check=False)
    assert other.returncode == 2 and "holds another sweep or search (overrides differ)" in other.stderr
    assert (broken / "optuna.db").read_bytes() == study_file  # another space never joins the study


def test_a_search_typed_with_hydras_resolver_continues(kd, tmp_path):
    # its multirun.yaml keeps ${hydra:...} as typed: read as a list it was resolved, which only a run can
    search = [*SEARCH[:-3], "hydra.sweeper.n_trials=1", "epochs=1", "data.root=${hydra:runtime.cwd}/data",
              f"hydra.sweep.dir={tmp_path / 's'}"]
    (tmp_path / "data").symlink_to(kd.root)
    kd(*search)
    kd(*[o.replace("n_trials=1", "n_trials=2") for o in search])  # one more trial, not "another search"
    assert len(study_of(tmp_path / "s").trials) == 2


def test_a_search_whose_config_changed_since_its_trials_ran_is_refused_not_mixed(kd, tmp_path):
    """More trials after a recipe file changed would optimise another objective in the same study.
    The changed file is played by the trial's own record of what it ran with, which the check reads."""
    sweep = tmp_path / "search"
    one = [*SEARCH[:-3], "hydra.sweeper.n_trials=1", *SEARCH[-2:], f"hydra.sweep.dir={sweep}"]
    kd(*one)
    record = trial_folder(sweep, 0) / ".hydra" / "config.yaml"
    record.write_text(record.read_text().replace("dropout_input: 0.0", "dropout_input: 0.2"))
    study_file = (sweep / "optuna.db").read_bytes()
    more = [o.replace("n_trials=1", "n_trials=2") for o in one]
    proc = kd(*more, check=False)
    assert proc.returncode == 2 and "sweep job 0_" in proc.stderr and "model.dropout_input=0.2" in proc.stderr, proc.stderr
    assert (sweep / "optuna.db").read_bytes() == study_file and len(list(sweep.glob("[0-9]*_*"))) == 1


def test_the_objective_is_validation_errors_and_a_failed_trial_is_recorded(kd, tmp_path):
    sweep = tmp_path / "search"
    # one epoch: errors still well above 0, so validation (100 images) and test (200) counts differ
    kd(*SEARCH[:-2], "epochs=1", "lr=choice(0.1,1e30)", "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep}")
    trials = study_of(sweep).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and complete and len(trials) == 5  # the search went on past its failures
    assert all(t.params["lr"] == 1e30 for t in failed) and all(t.params["lr"] == 0.1 for t in complete)
    for t in failed:  # diverged: the folder says so and keeps no state to resume
        folder = trial_folder(sweep, t.number)
        assert "diverged" in (folder / ERROR).read_text() and not (folder / METRICS).exists()
    ran = {t.number: metrics(trial_folder(sweep, t.number)) for t in complete}
    assert any(m["val_errors"] != m["test_errors"] for m in ran.values())  # else the next line tells nothing
    for t in complete:  # the study's value is the validation errors, never the test errors
        assert t.value == ran[t.number]["val_errors"] and ran[t.number]["val_size"] == 100

    report = (sweep / "report.md").read_text()  # written when the search ended
    # a setting is chosen by its runs' mean: trials that drew the same parameters are one setting
    settings = {}
    for t in complete:
        settings.setdefault(tuple(sorted(t.params.items())), []).append(t)
    chosen = min(settings.values(), key=lambda ts: (sum(t.value for t in ts) / len(ts), ts[0].number))
    tests = [metrics(trial_folder(sweep, t.number))["test_errors"] for t in chosen]
    quoted = f"**{tests[0]} test errors**" if len(chosen) == 1 else f"**{sum(tests) / len(tests):.1f} test errors**"
    jobs = ", ".join(str(t.number) for t in chosen)
    best = min(complete, key=lambda t: (t.value, t.number))  # optuna's own choice, one trial
    assert f"Best by validation: {jobs} (" in report and quoted in report
    assert report.count("| failed |") == len(failed) and (sweep / "search.png").exists()
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_trial: {best.number}\n" in results and "objective: val_errors" in results


@pytest.mark.parametrize("args, says", [
    (["train-student", "hparams_search=train_student"], "add -m"),
    ([*SEARCH, "data.val_size=0"], "set data.val_size"),
    ([*SEARCH[:4], "data.val_size=choice(100,0)", *SEARCH[5:]], "set data.val_size"),  # a trial with no split
    ([*SEARCH, "hydra.sweeper.params.lr=0"], "lr must be a finite number > 0"),  # a value the space fixes
    (["distill", "-m", "hparams_search=distill", "T=interval(0,5)"], "T must be a number in [0.01, 1000]"),
    ([*SEARCH, "hydra.sweeper.n_jobs=0"], "n_jobs >= 1"),
    ([*SEARCH, "hydra.sweeper.params.lr=choice(0.1,0.2)"], "Hydra cannot sweep its own keys"),
    (["evaluate", "-m", "hparams_search=distill"], "hparams_search"),
    (["train-student", "-m", "hparams_search=distill", "data.val_size=100"], "hparams_search=train_student"),
    ([*SEARCH, "hydra/sweeper/sampler=grid"], "for a grid"),
    (["train-student", "-m", "hydra/sweeper=optuna", "data.val_size=100"], "hparams_search=train_student"),
])
def test_a_search_that_cannot_be_judged_fairly_is_refused(kd, args, says):
    proc = kd(*args, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("kd: error:") and says in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (kd.cwd / "outputs").exists()


def test_report_quotes_the_test_errors_of_the_best_trial_by_validation_not_the_best_test(tmp_path):
    from kd_cli.report import report

    for num, (lr, val, test) in enumerate([(0.1, 9, 2), (0.2, 4, 12), (0.3, 4, 1)]):  # 1 and 2 tie on validation
        job = tmp_path / f"{num}_lr={lr}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- lr={lr}\n")
        (job / ".hydra" / "config.yaml").write_text(f"lr: {lr}\nepochs: 3\n")
        (job / METRICS).write_text(json.dumps({"test_errors": test, "test_error_rate": test / 200, "val_errors": val}))
    text = report([tmp_path])
    assert "Best by validation: 1 (`lr=0.2`), 4 validation errors; its **12 test errors**" in text
