"""Ranking losses as plain functions on tensors.

Every loss takes `scores`, `targets` and `mask`, all [Q, D] (Q queries, D candidate passages per query), and
returns a scalar. `mask` is bool, False marks padding (a query with fewer than D candidates); padded scores and
targets may hold anything and never change the value or the gradient. `targets` are graded relevance labels
(CL, BCE) or teacher targets (KD: `depth + 1 - rank` or teacher scores); higher means better.
`LOSSES` maps the names used in configs (`train.loss`) to the functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked(scores: Tensor, mask: Tensor) -> Tensor:
    """Scores with padding set to -inf, so softmax gives it probability 0 (finite min would leak under bf16)."""
    return scores.float().masked_fill(~mask, float("-inf"))


def _pairs(targets: Tensor, mask: Tensor) -> Tensor:
    """[Q, D, D] bool: (i, j) is a pair of unpadded candidates of one query with t_i > t_j."""
    valid = mask[:, :, None] & mask[:, None, :]  # [Q, D, D]
    return valid & (targets[:, :, None] > targets[:, None, :])


def _mean(values: Tensor, scores: Tensor) -> Tensor:
    """Mean of the selected terms; 0 (still attached to the graph) when a batch has none, e.g. all ties."""
    return values.mean() if values.numel() else scores.sum() * 0.0


def lce(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Localized Contrastive Estimation / InfoNCE: softmax cross-entropy with the relevant passage as the class.

    loss = mean over queries of  -log( exp(s_+) / sum_j exp(s_j) ),  where + is the candidate with the highest
    target (the first such column on ties; in CL data that is the one sampled relevant passage) and j runs
    over the query's unpadded candidates. Shapes: scores, targets, mask [Q, D] -> scalar. Padding is excluded
    from the normaliser.
    Gao, Dai, Callan: "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline", ECIR 2021,
    arXiv:2101.08751 (InfoNCE: van den Oord, Li, Vinyals, arXiv:1807.03748, 2018).
    """
    positive = targets.float().masked_fill(~mask, float("-inf")).argmax(dim=1)  # [Q]
    return F.cross_entropy(_masked(scores, mask), positive)


def bce(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Pointwise binary cross-entropy on logits (the monoBERT objective): each pair is classified on its own.

    loss = mean over unpadded (q, d) of  -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))],  y = 1 if t > 0
    else 0. Training feeds it `data.targets: relevant` (1 from the dataset's rel_level up, as sampling counts
    positives), so a TREC grade 1 ("related") is a negative on graded qrels. Shapes: scores, targets, mask [Q, D] -> scalar.
    Nogueira, Cho: "Passage Re-ranking with BERT", arXiv:1901.04085, 2019.
    """
    labels = (targets > 0).float()
    losses = F.binary_cross_entropy_with_logits(scores.float(), labels, reduction="none")  # [Q, D]
    return losses[mask].mean()


def rank_net(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """RankNet: logistic loss on every ordered pair of a query's candidates.

    loss = mean over all unpadded pairs (q, i, j) with t_i > t_j of  log(1 + exp(s_j - s_i)).  Pairs with equal
    targets are not used. Shapes: scores, targets, mask [Q, D] -> scalar (pairs [Q, D, D] inside).
    Burges et al.: "Learning to Rank using Gradient Descent", ICML 2005.
    """
    pairs = _pairs(targets, mask)  # [Q, D, D]
    s = scores.float()
    differences = s[:, None, :] - s[:, :, None]  # [Q, D, D]: s_j - s_i at (i, j)
    return _mean(F.softplus(differences[pairs]), scores)


def list_net(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """ListNet (top-1 probabilities) as a KL divergence between the target and the score distributions.

    loss = mean over queries of  KL(softmax(t) || softmax(s)) = sum_d p_d (log p_d - log softmax(s)_d),
    p = softmax(t), both softmaxes over the unpadded candidates only. Targets are used as logits (for teacher
    ranks `depth + 1 - rank` the top passage gets e times the mass of the second). Shapes: [Q, D] -> scalar.
    Cao et al.: "Learning to Rank: From Pairwise Approach to Listwise Approach", ICML 2007.
    """
    log_p = torch.log_softmax(_masked(targets, mask), dim=1)  # [Q, D]
    log_q = torch.log_softmax(_masked(scores, mask), dim=1)  # [Q, D]
    terms = log_p.exp() * (log_p - log_q)  # [Q, D]
    return terms.masked_fill(~mask, 0.0).sum(dim=1).mean()


def adr_mse(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """ADR-MSE: approximate-discounted-rank MSE, a differentiable distance to the target ranking.

    approx_rank_i = 1 + sum over unpadded j != i of sigmoid(s_j - s_i);  rank_i = 1 + #{j: t_j > t_i} +
    #{j != i: t_j = t_i} / 2 (ties share their mean rank);  loss = mean over unpadded (q, i) of
    (rank_i - approx_rank_i)^2 / log2(1 + rank_i), so errors at the top weigh most, as in nDCG.
    Shapes: scores, targets, mask [Q, D] -> scalar (pairs [Q, D, D] inside).
    Schlatt, Fröbe, Scells, Zhuang, Koopman, Zuccon, Stein, Potthast, Hagen: "A Systematic Investigation of
    Distilling Large Language Models into Cross-Encoders for Passage Re-ranking", arXiv:2405.07920, 2024.
    """
    valid = mask[:, :, None] & mask[:, None, :]  # [Q, D, D]: both candidates unpadded
    valid = valid & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)  # j != i
    s, t = scores.float(), targets.float()
    beats = torch.sigmoid(s[:, None, :] - s[:, :, None])  # [Q, D, D]: sigmoid(s_j - s_i) at (i, j)
    approx = 1 + (beats * valid).sum(dim=2)  # [Q, D]
    greater = ((t[:, None, :] > t[:, :, None]) & valid).sum(dim=2)  # [Q, D]
    equal = ((t[:, None, :] == t[:, :, None]) & valid).sum(dim=2)  # [Q, D]
    rank = 1 + greater + equal / 2
    losses = (rank - approx) ** 2 / torch.log2(1 + rank)  # [Q, D]
    return losses[mask].mean()


def margin_mse(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """MarginMSE: the student's score margins regress onto the teacher's (targets = teacher scores).

    loss = mean over unpadded pairs (q, i, j), i < j, with t_i != t_j of  ((s_i - s_j) - (t_i - t_j))^2: pairs
    with equal targets are not used (as in lightning-ir's MarginMSE, which pairs t_i > t_j). With D = 2 (a
    positive and a negative) this is the original triple form. Shapes: scores, targets, mask [Q, D] -> scalar.
    Hofstätter, Althammer, Schröder, Sertkan, Hanbury: "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation", arXiv:2010.02666, 2020.
    """
    upper = torch.triu(torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device), 1)
    s, t = scores.float(), targets.float()
    differ = t[:, :, None] != t[:, None, :]  # [Q, D, D]
    pairs = mask[:, :, None] & mask[:, None, :] & upper & differ  # [Q, D, D]: i < j, both unpadded, t_i != t_j
    student = s[:, :, None] - s[:, None, :]  # [Q, D, D]: s_i - s_j
    teacher = t[:, :, None] - t[:, None, :]  # [Q, D, D]
    return _mean((student - teacher)[pairs] ** 2, scores)


LOSSES = {
    "lce": lce,
    "bce": bce,
    "rank_net": rank_net,
    "list_net": list_net,
    "adr_mse": adr_mse,
    "margin_mse": margin_mse,
}
