"""The MLPs of the paper, and the max-norm constraint on hidden units."""
import torch
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout with masks cut from random bytes: on CPU, torch's dropout draws one random
    number per unit and was half of a teacher's training step; a byte per unit is 8x less RNG work
    and float arithmetic avoids slow bool kernels. The drop rate is rounded to the nearest 1/256
    (0.2 -> 0.1992, 0.5 exact) and kept units are scaled by 256/kept so the expectation is exact.
    On CUDA, torch's own dropout is already fast."""

    def __init__(self, p):
        super().__init__()
        self.p = float(p)
        self.kept = round(256 * (1 - self.p))  # a unit is kept when its random byte is < kept

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.is_cuda:
            return nn.functional.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
        byte = words.view(torch.uint8)[:n].view(x.shape).float()
        mask = byte.sub_(self.kept).neg_().clamp_(0, 1).mul_(256 / self.kept)  # 0 or 256/kept
        return x * mask

    def extra_repr(self):
        return f"p={self.p}"


class MLP(nn.Module):
    """in -> [Linear, ReLU, Dropout] * len(hidden) -> Linear, with dropout on the inputs too."""

    def __init__(self, hidden, in_features=784, out_features=10, dropout_input=0.0, dropout_hidden=0.0):
        super().__init__()
        self.arch = dict(hidden=list(hidden), in_features=in_features, out_features=out_features,
                         dropout_input=float(dropout_input), dropout_hidden=float(dropout_hidden))
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], out_features)
        self.drop_in = Dropout(dropout_input)
        self.drop_hidden = Dropout(dropout_hidden)

    def forward(self, x):
        x = self.drop_in(x.flatten(1))
        for layer in self.hidden:
            x = self.drop_hidden(torch.relu(layer(x)))
        return self.out(x)


def build_mlp(arch):
    """An MLP from the `arch` dict a checkpoint stores (or a model config)."""
    return MLP(hidden=list(arch["hidden"]), in_features=arch.get("in_features", 784),
               out_features=arch.get("out_features", 10),
               dropout_input=arch.get("dropout_input", 0.0), dropout_hidden=arch.get("dropout_hidden", 0.0))


@torch.no_grad()
def apply_max_norm_(model, max_norm):
    """Scale down any hidden unit whose incoming weight vector is longer than max_norm.
    A row of a Linear weight is one unit's incoming weights, so renorm along dim 0."""
    for layer in model.hidden:
        layer.weight.renorm_(2, 0, max_norm)
