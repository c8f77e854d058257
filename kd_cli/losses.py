"""The distillation loss of Hinton, Vinyals & Dean (2015), written with log_softmax.

Names follow the paper: z student logits, v teacher logits, q = softmax(z/T) the student's
tempered distribution, p = softmax(v/T) the teacher's (the soft targets).
"""
import torch.nn.functional as F


def hard_label_loss(student_logits, labels, target=None):
    """CE(softmax(z), y): the teacher's and the baseline student's loss, in the loop's one
    signature loss(z, y or None, target or None)."""
    return F.cross_entropy(student_logits, labels)


def soft_targets(teacher_logits, T):
    """log p = log_softmax(v / T). Kept as log-probabilities: exact where p underflows to 0."""
    return F.log_softmax(teacher_logits / T, dim=-1)  # [N, C], or [copies, N, C]


def soft_loss(student_logits, log_p, T):
    """KL(p || q), mean over the batch (the 'batchmean' of KLDivLoss, not a mean over classes).
    It equals CE(p, q) minus p's entropy, a constant, so its gradient is the paper's
    dC/dz_i = (q_i - p_i) / T; unlike CE it reaches 0 when the student matches the teacher."""
    log_q = F.log_softmax(student_logits / T, dim=1)
    # KL >= 0, but where q matches p to float32's rounding a case's sum can come out a hair below
    # 0; T^2 then magnifies it (T=1e6 once trained on a loss of -5578). Clamped per case, a
    # loss that is never negative, and the gradient of a case that is already matched is ~0.
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0).mean()


def with_hard_labels(weighted_soft_term, student_logits, labels, alpha):
    """alpha * CE(softmax(z), y) + weighted_soft_term(1 - alpha). The soft term is only computed
    when it has weight, and the labels are only read when alpha > 0 (an unlabeled transfer set).
    The soft term applies its weight itself, so its float operations keep their order."""
    loss = 0.0
    if alpha < 1:
        loss = weighted_soft_term(1 - alpha)
    if alpha > 0:
        loss = loss + alpha * hard_label_loss(student_logits, labels)  # one hard-label term for every stage
    return loss


def distillation_loss(student_logits, labels, log_p, T, alpha):
    """alpha * CE(softmax(z), y) + (1 - alpha) * T^2 * KL(p || softmax(z/T)).

    T^2 keeps the soft gradients' scale independent of T. alpha=1 is plain supervised training;
    with alpha=0 the labels are never read (an unlabeled transfer set).
    """
    return with_hard_labels(lambda w: w * T * T * soft_loss(student_logits, log_p, T), student_logits, labels, alpha)


def logit_mse(student_logits, teacher_logits):
    """Caruana et al.'s logit matching: (1 / 2C) * sum_i (z_i - v_i)^2, mean over the batch. Its
    gradient (z_i - v_i) / C is the limit of the distillation gradient (times T^2) at high T for
    zero-meaned logits, so the two losses sit on one scale."""
    c = student_logits.shape[1]
    return ((student_logits - teacher_logits) ** 2).sum(dim=1).mean() / (2 * c)


def logit_matching_loss(student_logits, labels, teacher_logits, alpha):
    """alpha * CE(softmax(z), y) + (1 - alpha) * logit_mse(z, v): `loss=logit_mse` of kd distill."""
    return with_hard_labels(lambda w: w * logit_mse(student_logits, teacher_logits), student_logits, labels, alpha)
