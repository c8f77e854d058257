"""kd report's plots: test errors against the swept value, and each run's learning curves."""
from itertools import groupby

SEED = "seed"


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return matplotlib, plt


def x_axis(swept, rows):
    """What to plot along x: T when it is swept, else the first swept key with numeric values."""
    numeric = [k for k in swept if k != SEED and all(_number(r["values"].get(k)) is not None
                                                     for r in rows if r["status"] == "done")]
    return "T" if "T" in numeric else (numeric[0] if numeric else None)


def plot(path, rows, swept):
    """Test errors against the x key, one line per combination of the other swept values; with a
    seed sweep, the mean over seeds with min-max bars. Returns False when there is nothing to plot."""
    from .report import seed_groups

    matplotlib, plt = _pyplot()
    x = x_axis(swept, rows)
    groups = seed_groups(rows, swept)
    if not groups or (x is None and SEED not in swept):
        return False
    lines = [k for k in swept if k not in (x, SEED)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    label_of = lambda g: ", ".join(f"{k}={g['values'][k]}" for k in lines) or "test errors"  # noqa: E731
    for label, members in groupby(sorted(groups, key=label_of), key=label_of):
        members = sorted(members, key=lambda g: _number(g["values"].get(x)) if x else 0)
        xs = [_number(g["values"][x]) for g in members] if x else list(range(len(members)))
        ys = [g["mean"] for g in members]
        err = [[g["mean"] - g["min"] for g in members], [g["max"] - g["mean"] for g in members]]
        ax.errorbar(xs, ys, yerr=err if SEED in swept else None, marker="o", capsize=3, label=label)
    ax.set_xlabel(x or "group")
    ax.set_ylabel("test errors" + (" (mean over seeds, min-max)" if SEED in swept else ""))
    if x == "T":
        ax.set_xscale("log")
        ax.set_xticks(sorted({_number(r["values"]["T"]) for r in rows if _number(r["values"].get("T"))}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    means = [g["mean"] for g in groups if g["mean"] > 0]
    if means and max(means) > 5 * min(means):  # a collapsed run would flatten every other curve
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def validation_plot(path, rows, swept, best=None):
    """A search's picture: validation errors against each searched parameter, one panel each,
    the best trial starred. Returns False when no finished trial has validation errors."""
    runs = [r for r in rows if r["status"] == "done" and r.get("val_errors") is not None]
    keys = [k for k in swept if k != SEED and all(_number(r["values"].get(k)) is not None for r in runs)][:6]
    if not runs or not keys:
        return False
    matplotlib, plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [_number(r["values"][k]) for r in runs]
        ax.scatter(xs, [r["val_errors"] for r in runs], s=18)
        if best is not None:
            ax.scatter([_number(best["values"][k])], [best["val_errors"]], marker="*", s=160, color="C3",
                       label="best by validation")
        if min(xs) > 0 and max(xs) >= 10 * min(xs):  # a range searched on a log scale
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^0 ... labels overlap
        ax.set_xlabel(k)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("validation errors")
    if best is not None:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def learning_curves(path, rows, swept):
    """Per run: the training loss (left) and the test errors, solid, and validation errors, dashed
    (right) per epoch; epoch 0 is the untrained model. Returns False when no run has a history."""
    runs = [r for r in rows if r["status"] == "done" and len(r["history"]) > 1]
    if not runs:
        return False
    matplotlib, plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in runs:
        label = ", ".join(f"{k}={r['values'].get(k)}" for k in swept) or r["job"].rsplit("/", 1)[-1]
        trained = [h for h in r["history"] if "loss" in h]
        line, = ax_loss.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], label=label)
        counted = [h for h in r["history"] if "test_errors" in h]  # every eval_every-th epoch
        ax_err.plot([h["epoch"] for h in counted], [h["test_errors"] for h in counted], color=line.get_color())
        if all("val_errors" in h for h in counted):
            ax_err.plot([h["epoch"] for h in counted], [h["val_errors"] for h in counted], "--", color=line.get_color())
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_err.set(xlabel="epoch", ylabel="test errors (solid), validation errors (dashed)", yscale="log")
    for ax in (ax_loss, ax_err):
        # plain tick labels: the default 10^k ones go through mathtext, a second per report
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(minor_thresholds=(2, 0.5)))
        ax.grid(alpha=0.3, which="both")
    if len(runs) <= 12:
        ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
