"""Test errors: total, per class, and the confusion matrix."""
import torch

from .errors import KDError


class NonFiniteOutputs(KDError):
    """A model whose outputs are NaN or infinite: no error count is made from them (argmax would
    still pick a class, and the count would look like a result)."""


def _refuse_non_finite(bad, what):
    rows = int(bad.any(dim=1).sum())
    if rows:
        raise NonFiniteOutputs(f"{what} on {rows} of {bad.shape[0]} images are NaN or infinite, so no error "
                               "count is made from them: the weights have grown too large (lower lr, or set "
                               "optim.clip_grad_norm=5, and train again)")


@torch.inference_mode()
def predict_logits(model, x, batch_size=10000):
    """The model's logits in eval mode (dropout off), in large batches."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(batch_size)])
    model.train(was_training)
    _refuse_non_finite(~torch.isfinite(logits), "the model's outputs")
    return logits


def count_errors(logits, labels, num_classes=10):
    """A dict of plain ints: test_errors, test_total, per_class_errors, confusion (rows: true).
    -inf is allowed (the log of a probability that underflowed to 0), NaN and +inf are not."""
    _refuse_non_finite(torch.isnan(logits) | torch.isposinf(logits), "the scores to count errors from")
    pred = logits.argmax(dim=1)
    wrong = pred != labels
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2)
    return {
        "test_errors": int(wrong.sum()),
        "test_total": int(labels.numel()),
        "per_class_errors": torch.bincount(labels[wrong], minlength=num_classes).tolist(),
        "confusion": confusion.view(num_classes, num_classes).tolist(),
    }


def shift_biases(logits, shift):
    """Logits as if `shift[c]` were added to the output bias of each class c: the same thing,
    since the output layer is linear."""
    out = logits.clone()
    for c, s in shift.items():
        out[:, int(c)] += float(s)
    return out


def fit_bias_shift(logits, labels, classes, low=-20.0, high=20.0, step=0.05):
    """One shift, added to the biases of all `classes`, that minimises errors on (logits, labels):
    a 1-D grid search. Call it with validation data only. Of the shifts that tie for fewest errors,
    takes the median, the one farthest inside the best range. Returns (shift, errors there)."""
    grid = torch.arange(round((high - low) / step) + 1, device=logits.device) * step + low
    cols = torch.tensor(sorted(classes), device=logits.device)
    errors = torch.empty(grid.numel(), dtype=torch.long)
    for i, s in enumerate(grid.tolist()):
        shifted = logits.clone()
        shifted[:, cols] += s
        errors[i] = int((shifted.argmax(1) != labels).sum())
    best = (errors == errors.min()).nonzero().squeeze(1)
    pick = int(best[best.numel() // 2])
    return round(float(grid[pick]), 6), int(errors[pick])


def errors_on(counts, classes, labels):
    """Errors and images of `classes` only: the numbers the paper quotes for the shifted digits."""
    total = int(sum(int((labels == c).sum()) for c in classes))
    return {"errors": int(sum(counts["per_class_errors"][c] for c in classes)), "images": total}


def bias_correction(test_logits, test_y, shift=None, fit_classes=None, val_logits=None, val_y=None):
    """The paper's fix for a class the transfer set lacked: add `shift` ({class: amount}) to output
    biases, or fit one shift for `fit_classes` on validation logits (never the test set). Returns
    the shifted test logits and a record of the errors before and after, total and on the
    shifted classes."""
    shift, record = dict(shift or {}), {}
    if fit_classes:
        value, val_after = fit_bias_shift(val_logits, val_y, fit_classes)
        shift = {c: value for c in sorted(fit_classes)}
        record = {"fitted_on": "validation split", "val_size": int(val_y.numel()),
                  "val_errors_before": count_errors(val_logits, val_y)["test_errors"], "val_errors_after": val_after}
    classes = sorted(shift)

    def summary(logits):
        counts = count_errors(logits, test_y)
        return {"test_errors": counts["test_errors"], "per_class_errors": counts["per_class_errors"],
                "on_shifted_classes": errors_on(counts, classes, test_y)}

    shifted = shift_biases(test_logits, shift)
    return shifted, {"shift": {str(c): v for c, v in shift.items()}, **record,
                     "before": summary(test_logits), "after": summary(shifted)}
