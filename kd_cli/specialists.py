"""Specialist models (paper, section 5): confusable class subsets from a generalist, the
specialists' data mix and dustbin class, and the KL combination that gives one distribution.

A specialist for class subset S has |S| + 1 outputs: the classes of S in order, then a dustbin
that stands for every other class.
"""
import math

import torch

from .checkpoint import cpu_weights
from .errors import KDError
from .evaluate import count_errors, predict_logits
from .losses import hard_label_loss
from .models import build_mlp
from .train import train


def covariance_clusters(predictions, k, seed=0, iterations=100):
    """Class subsets the generalist confuses: k-means (k-means++ start, seeded) on the columns of
    the covariance matrix of its predictions [N, C]. Classes that are predicted together covary
    alike and land in one cluster. Pass log-probabilities: with a confident generalist the
    covariance of probabilities is all diagonal (on MNIST it put 8 digits in one cluster and 1 and
    6 alone), while log-probabilities keep the near misses (4 with 9, 3 with 5 and 8).
    Returns sorted lists of classes, largest first."""
    c = predictions.shape[1]
    if not 1 <= k <= c:
        raise KDError(f"clusters must be in 1..{c}, got {k}")
    centred = predictions.double() - predictions.double().mean(0)
    columns = (centred.T @ centred) / (predictions.shape[0] - 1)  # [C, C]; column j describes class j
    gen = torch.Generator().manual_seed(seed)
    centres = columns[torch.randint(c, (1,), generator=gen)]
    while centres.shape[0] < k:  # k-means++: next centre far from the chosen ones
        d2 = torch.cdist(columns, centres).min(1).values ** 2
        pick = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(c), 1, generator=gen)
        centres = torch.cat([centres, columns[pick]])
    for _ in range(iterations):
        assign = torch.cdist(columns, centres).argmin(1)
        moved = torch.stack([columns[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(moved, centres):
            break
        centres = moved
    groups = [sorted(torch.nonzero(assign == j).flatten().tolist()) for j in range(k)]
    return sorted((g for g in groups if g), key=lambda g: (-len(g), g))


def specialist_data(x, y, classes, seed=0):
    """Half the specialist's training images from its classes (all of them), half from the rest
    (a seeded sample of as many), labels mapped to 0..|S|-1 and |S| for the dustbin. Returns
    (x, y, dustbin_shift): the log of the factor by which the mix over-represents S against the
    rest, which the dustbin logit gets back after training (the paper's correction)."""
    classes = sorted(classes)
    inside = torch.isin(y, torch.tensor(classes, device=y.device))
    ins, rest = inside.nonzero().flatten(), (~inside).nonzero().flatten()
    if ins.numel() == 0 or rest.numel() == 0:
        raise KDError(f"a specialist for {classes} needs images of those classes and of others")
    gen = torch.Generator().manual_seed(seed)
    take = rest[torch.randperm(rest.numel(), generator=gen)[:ins.numel()].to(rest.device)]
    keep = torch.cat([ins, take]).sort().values
    mapping = torch.full((int(y.max()) + 1,), len(classes), dtype=torch.long, device=y.device)
    mapping[torch.tensor(classes, device=y.device)] = torch.arange(len(classes), device=y.device)
    # true odds rest : S are rest/ins; in the mix they are take/ins
    dustbin_shift = math.log(rest.numel() / ins.numel()) - math.log(take.numel() / ins.numel())
    return x[keep], mapping[y[keep]], dustbin_shift


def specialist_head(generalist_out, classes):
    """The specialist's output layer, initialised from the generalist's: the rows of S as they
    are, and for the dustbin the log-sum-exp-like mean of the other rows (their mean weight, and
    their mean bias plus the log of how many they are)."""
    w, b = generalist_out.weight.detach(), generalist_out.bias.detach()
    others = [c for c in range(w.shape[0]) if c not in classes]
    weight = torch.cat([w[classes], w[others].mean(0, keepdim=True)])
    bias = torch.cat([b[classes], (b[others].mean() + math.log(len(others))).view(1)])
    return weight, bias


def active_specialists(generalist_probs, subsets, top_n):
    """[B, M] bool: specialist m is active for a case when its classes meet the generalist's
    top_n most probable classes for that case."""
    top = generalist_probs.topk(top_n, dim=1).indices  # [B, n]
    member = torch.zeros(len(subsets), generalist_probs.shape[1], dtype=torch.bool, device=top.device)
    for m, s in enumerate(subsets):
        member[m, s] = True
    return member[:, top].any(-1).T  # [B, M]


def specialist_log_q(log_q, classes):
    """log q as specialist m sees it: its classes, then the dustbin (the mass of all others)."""
    others = [c for c in range(log_q.shape[1]) if c not in classes]
    return torch.cat([log_q[:, classes], torch.logsumexp(log_q[:, others], dim=1, keepdim=True)], dim=1)


def kl_objective(log_q, p_g, p_specialists, subsets, active):
    """Per case: KL(p_g || q) + sum over active m of KL(p_m || q_m)."""
    def kl(p, log_q_):
        return (p * (torch.log(p.clamp_min(1e-30)) - log_q_)).sum(1)
    total = kl(p_g, log_q)
    for m, (p_m, s) in enumerate(zip(p_specialists, subsets)):
        total = total + active[:, m] * kl(p_m, specialist_log_q(log_q, s))
    return total


def combine(p_g, p_specialists, subsets, active, steps=200):
    """The full distribution q [B, C] minimising kl_objective for every case at once, by L-BFGS on
    q's logits started from the generalist's; cases with no active specialist keep q = p_g."""
    u = torch.log(p_g.clamp_min(1e-30)).clone().requires_grad_()
    opt = torch.optim.LBFGS([u], lr=1, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kl_objective(torch.log_softmax(u, 1), p_g, p_specialists, subsets, active).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    q = torch.softmax(u.detach(), 1)
    none = ~active.any(1)
    q[none] = p_g[none]
    return q


def train_specialist(generalist, classes, x, y, recipe, jitter_pixels=0, seed=0, elastic=None):
    """One specialist for `classes`: the generalist's hidden layers and head (specialist_head) as
    the start, fine-tuned on specialist_data, then its dustbin corrected for the oversampling.
    Returns (model in eval mode, record for the checkpoint)."""
    xs, ys, shift = specialist_data(x, y, classes, seed)
    model = build_mlp({**generalist.arch, "out_features": len(classes) + 1}).to(x.device)
    with torch.no_grad():
        for mine, theirs in zip(model.hidden, generalist.hidden):
            mine.load_state_dict(theirs.state_dict())
        model.out.weight[:], model.out.bias[:] = specialist_head(generalist.out, classes)
    result = train(model, xs, ys, hard_label_loss, recipe, jitter_pixels=jitter_pixels, elastic=elastic,
                   desc=f"specialist {classes}")
    with torch.no_grad():
        model.out.bias[-1] += shift  # undo the dustbin's under-representation in the mix
    return model.eval(), {"classes": classes, "train_images": int(ys.numel()), "dustbin_shift": round(shift, 6),
                          "train_seconds": round(result["train_seconds"], 3), "arch": model.arch,
                          "state_dict": cpu_weights(model)}


def evaluate_combination(generalist, specialists, subsets, top_n, test_x, test_y, batch_size):
    """Test errors of the generalist alone and combined with its specialists: the counts of the
    combination (count_errors), and the generalist's for comparison."""
    p_g = torch.softmax(predict_logits(generalist, test_x, batch_size), 1)
    p_m = [torch.softmax(predict_logits(m, test_x, batch_size), 1) for m in specialists]
    active = active_specialists(p_g, subsets, top_n)
    q = combine(p_g, p_m, subsets, active)
    alone, together = count_errors(p_g.log(), test_y), count_errors(q.log(), test_y)
    any_active = active.any(1)
    return {**together, "test_error_rate": together["test_errors"] / together["test_total"],
            "generalist_test_errors": alone["test_errors"], "generalist_per_class_errors": alone["per_class_errors"],
            "cases_with_active_specialists": int(any_active.sum()),
            "errors_where_active": {"generalist": int((p_g.argmax(1) != test_y)[any_active].sum()),
                                    "combined": int((q.argmax(1) != test_y)[any_active].sum())}}
