"""Test errors: total, per class, and the confusion matrix."""
import torch


@torch.inference_mode()
def predict_logits(model, x, batch_size=10000):
    """The model's logits in eval mode (dropout off), in large batches."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(batch_size)])
    model.train(was_training)
    return logits


def count_errors(logits, labels, num_classes=10):
    """A dict of plain ints: test_errors, test_total, per_class_errors, confusion (rows: true)."""
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
