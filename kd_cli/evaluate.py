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
