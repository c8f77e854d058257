"""The paper's transfer-set experiments on MNIST, measured, each one command:

    python scripts/transfer_experiments.py omit3        # digit 3 left out; the 3-bias shifted
    python scripts/transfer_experiments.py only78       # only 7s and 8s; their biases shifted
    python scripts/transfer_experiments.py little_data  # 3% of the data: hard labels vs soft targets
    python scripts/transfer_experiments.py width_vs_T   # T in 1..20 for students of 800, 300, 30 units
    python scripts/transfer_experiments.py all --teacher pretrained   # or outputs/train-teacher/<stamp>/checkpoint.pt

Runs the installed `kd` (the experiment= presets of conf/experiment/ and one `kd distill -m` sweep)
into outputs/transfer/<stamp>/<experiment>/, and writes each experiment's Markdown table, paper
beside ours, to <experiment>/table.md (printed too). Bias shifts are fitted on the validation split
the presets hold out (data.val_size=10000), never on the test set. --extra adds overrides to every
run (e.g. "epochs=1 data.train_limit=12000" for a smoke run). A stopped or killed run of the script
continues with the same command plus --resume: finished runs are kept, the others continue with kd's
own `resume=` (the config each run started with), and runs not begun yet start; a --teacher or
--extra other than the call's that began them is refused (each experiment's call.json records it).
"""
import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

from kd_cli.checkpoint import newest_checkpoint, teacher_override
from kd_cli.cli import installed
from kd_cli.preflight import sweep_in
from kd_cli.jobs import rows_of
from kd_cli.teachers import TEACHER_STAGE

WIDTH_TS = [1, 2, 2.5, 3, 4, 5, 8, 10, 20]
WIDTHS = [800, 300, 30]
RESUME = False  # --resume: continue the runs an earlier call left in --out (set by main)
CALL = "call.json"  # in each experiment's folder: the teacher and --extra its runs were started with


def run(cmd, folder):
    """Run a kd command, or with --resume continue its run or sweep in `folder` if one was begun
    there (kd's resume= reads what the folder started with; a finished sweep's jobs are kept)."""
    if RESUME and Path(folder).exists():
        cmd = [*cmd[:2], f"resume={folder}"]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(installed(cmd), check=True)


def kd(stage, run_dir, *overrides):
    metrics = Path(run_dir) / "metrics.json"
    if not (RESUME and metrics.exists()):  # with --resume a finished run is kept as it is
        run(["kd", stage, *overrides, f"hydra.run.dir={run_dir}"], run_dir)
    return json.loads(metrics.read_text())


def same_call(folder, call):
    """Record the teacher and --extra an experiment's runs start with; refuse to keep, continue or
    add to them under others (the table would mix runs of two calls)."""
    record = folder / CALL
    if record.is_file():  # with or without --resume: a refused call must not leave its own record
        then = json.loads(record.read_text())
        if then != call:
            raise SystemExit(f"transfer_experiments: error: {folder} was begun with {then}, and this call gives "
                             f"{call}; continue it with the --teacher and --extra it was begun with, or give a new --out")
        return
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(call) + "\n")


def best_on_validation(metrics):
    """Test errors at the epoch with the fewest validation errors (early stopping chosen on
    held-out training images, as one would without a test set); of tied epochs, the latest."""
    counted = [r for r in metrics["history"] if "val_errors" in r]  # the epochs evaluated (eval_every)
    row = min(counted, key=lambda r: (r["val_errors"], -r["epoch"]))
    return row["test_errors"], row["epoch"]


def bias_experiment(out, extra, teacher, preset, classes, paper_shift, paper, show):
    """Distill with a transfer-set preset, then evaluate with the paper's bias shift and with one
    fitted on the validation split. `show(bias_record, 'before'|'after', test images)` formats one cell."""
    d = kd("distill", out / "distilled", f"experiment={preset}", *teacher, *extra)
    ckpt = out / "distilled" / "checkpoint.pt"
    evaluated = kd("evaluate", out / "paper-shift", f"checkpoint={ckpt}",
                   "bias_shift={" + ",".join(f"{c}:{paper_shift}" for c in classes) + "}")
    given, total = evaluated["bias"], evaluated["test_total"]
    fitted = kd("evaluate", out / "fitted-shift", f"checkpoint={ckpt}",
                f"fit_bias=[{','.join(map(str, classes))}]")["bias"]
    biases = " and ".join(f"{c}" for c in classes) + f"-bias{'es' if len(classes) > 1 else ''}"
    return [
        f"| distilled, transfer set `experiment={preset}` | paper | ours |", "| --- | --- | --- |",
        f"| test errors | {paper[0]} | {show(given, 'before', total)} |",
        f"| {biases} {paper_shift:+g} (the paper's value) | {paper[1]} | {show(given, 'after', total)} |",
        f"| {biases} {float(fitted['shift'][str(classes[0])]):+.2f}, fitted on the validation split | - | "
        f"{show(fitted, 'after', total)} |",
        "", f"Transfer set: {d['transfer']['size']} images, classes {d['transfer']['classes']}; "
            f"T={d['T']:g}, alpha={d['alpha']:g}; validation errors {fitted['val_errors_before']} -> "
            f"{fitted['val_errors_after']} of {fitted['val_size']}; distill wall {d['wall_seconds']:.0f} s."]


def omit3(out, extra, teacher):
    def show(b, k, total):
        return f"{b[k]['test_errors']} ({b[k]['on_shifted_classes']['errors']} of {b[k]['on_shifted_classes']['images']} 3s)"
    return bias_experiment(out, extra, teacher, "omit3", [3], 3.5, ["206 (133 of 1010 3s)", "109 (14 of 1010 3s)"], show)


def only78(out, extra, teacher):
    def show(b, k, total):
        return f"{100 * b[k]['test_errors'] / total:.1f}% ({b[k]['test_errors']} errors)"
    return bias_experiment(out, extra, teacher, "only78", [7, 8], -7.6, ["47.3%", "13.2%"], show)


def little_data(out, extra, teacher):
    runs = {
        "hard labels, 3% of the training set": kd("train-student", out / "hard-3pct", "experiment=little_data", *extra),
        "soft targets only (alpha=0), 3%": kd("distill", out / "soft-3pct", "experiment=little_data", "alpha=0",
                                              *teacher, *extra),
        "hard labels, 100% of the training set": kd("train-student", out / "hard-100pct", "data.val_size=10000", *extra),
    }
    lines = ["| 784-800-800-10 student | images | epochs | test errors, last epoch | test errors at the best validation epoch |",
             "| --- | --- | --- | --- | --- |"]
    for name, m in runs.items():
        errors, epoch = best_on_validation(m)
        lines.append(f"| {name} | {m['transfer']['size']} | {m['epochs']} | {m['test_errors']} | {errors} (epoch {epoch}) |")
    soft = runs["soft targets only (alpha=0), 3%"]
    lines += ["", f"Paper (speech, frame accuracy): 3% hard 44.5%, 3% soft 57.0%, 100% hard 58.9%. Soft: T={soft['T']:g}."]
    return lines


def done_rows(sweep):
    return [r for r in rows_of([sweep]) if r["status"] == "done"]


def hidden_of(row):
    return int(row["values"]["model.hidden"].strip("[]").split(",")[0])


def width_vs_T(out, extra, teacher):
    sweep = out / "sweep"
    ts, widths = ",".join(f"{t:g}" for t in WIDTH_TS), ",".join(f"[{w},{w}]" for w in WIDTHS)
    # recipe=paper: the paper's 20-epoch unjittered setup, at each T (the README's measured table)
    cmd = ["kd", "distill", "-m", f"T={ts}", f"model.hidden={widths}", "recipe=paper", *teacher, *extra,
           f"hydra.sweep.dir={sweep}"]
    run(cmd, sweep)
    run(["kd", "train-student", "-m", f"model.hidden={widths}", *extra, f"hydra.sweep.dir={out / 'hard'}"], out / "hard")
    # kd report's rows (what each job ran: its width and T from its own config)
    done = done_rows(sweep)
    table = {(hidden_of(r), float(r["values"]["T"])): r["test_errors"] for r in done}
    alphas = ", ".join(sorted({f'{float(r["values"]["alpha"]):g}' for r in done})) or "-"  # as run (--extra may set it)
    hard = {hidden_of(r): r["test_errors"] for r in done_rows(out / "hard")}
    lines = ["| units per layer | hard labels | " + " | ".join(f"T={t:g}" for t in WIDTH_TS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in WIDTH_TS) + " |"]
    for w in WIDTHS:
        row = [table.get((w, float(t)), "-") for t in WIDTH_TS]
        best = min((v for v in row if v != "-"), default=None)
        cells = [f"**{v}**" if v == best else str(v) for v in row]
        lines.append(f"| {w} | {hard.get(w, '-')} | " + " | ".join(cells) + " |")
    return lines + ["", f"Test errors of 784-w-w-10 students distilled with alpha={alphas} (bold: fewest per width). "
                        "Paper: >= 300 units, all T above 8 similar; 30 units, T in 2.5-4 best."]


EXPERIMENTS = {"omit3": omit3, "only78": only78, "little_data": little_data, "width_vs_T": width_vs_T}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--teacher", default=None,
                    help="teacher checkpoint, or `pretrained` (the teacher kd ships; default: kd's newest teacher)")
    ap.add_argument("--extra", default="", help="overrides added to every run")
    ap.add_argument("--out", default=None, help="default outputs/transfer/<stamp>")
    ap.add_argument("--resume", action="store_true",
                    help="continue a stopped call with the same --out: keep finished runs, resume the rest")
    args = ap.parse_args()
    if args.resume and not args.out:
        raise SystemExit("transfer_experiments: error: --resume needs the --out of the call to continue")
    swept = sweep_in(shlex.split(args.extra))
    if swept:  # a table cell is one setting (width_vs_T would keep one seed of a swept seed per cell)
        raise SystemExit(f"transfer_experiments: error: --extra {swept} is a sweep; give one value per call "
                         "(another --out), or sweep with kd -m and compare with kd report")
    global RESUME
    RESUME = args.resume
    out = Path(args.out or f"outputs/transfer/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    teacher = [f"teacher={teacher_override(args.teacher)}"] if args.teacher else []
    if not teacher:  # kd's newest teacher, pinned now: runs begun after another teacher is trained use it too
        newest = newest_checkpoint("outputs", TEACHER_STAGE)
        teacher = [f"teacher={newest.resolve()}"] if newest is not None else []
    names = list(EXPERIMENTS) if "all" in args.experiments else args.experiments
    for name in names:
        started = time.time()
        same_call(out / name, {"teacher": teacher, "extra": shlex.split(args.extra)})
        lines = EXPERIMENTS[name](out / name, shlex.split(args.extra), teacher)
        lines.append(f"Wall time of the whole experiment: {(time.time() - started) / 60:.1f} min.")
        text = "\n".join(lines)
        print(f"\n## {name}\n{text}\n", flush=True)
        (out / name / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
