"""Redundancy-aware pieces of Set-Encoder training and evaluation (Schlatt et al., ECIR 2025, arXiv:2404.06912):

- stage 1's auxiliary task: a list holds one duplicated passage; `duplicate_targets` marks the passages that
  have a copy in their list, `duplicate_bce` is the loss of the model's duplicate head;
- the novelty variant: passages of a query are clustered by the Jaccard distance of their token sets
  (`cluster_passages`, on the reference's tokens by default: `reference_tokens`); `novelty_targets` let only the
  best-scored member of each cluster keep the cluster's best teacher target (training composes them with
  `train.loss`; with RankNet that is Novelty-Aware RankNet, NA-RankNet);
  `alpha_ndcg` evaluates with the clusters as subtopics.

Losses are functions on tensors (`scores`, `targets`, `mask`, all [Q, D]; mask False = padding) to a scalar.
"""
from __future__ import annotations

import functools
import math
import random
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from torch import Tensor

from crossrank.errors import CrossrankError

WORD = re.compile(r"\w+")
REFERENCE_TOKENS = 512  # the reference clusters on the first 512 tokens of a passage


def reference_tokens(text: str) -> set[str]:
    """The token set the Set-Encoder reference clusters on (webis-de/set-encoder, utils/create_novelty_runs.py):
    NLTK's `word_tokenize` (sentences first, then Treebank rules: case kept, punctuation and clitics such as
    "n't" are tokens), the first 512 tokens. `word_tokenize` splits sentences with NLTK's trained punkt model,
    which is data (`python -m nltk.downloader punkt_tab`); without it NLTK's untrained Punkt splitter is used
    (a note says so once), which differs only around abbreviations: on the TREC DL 2019/2020 passages that have
    text, 3184 of the 3189 pairs the reference puts in one cluster are closer than 0.5 with it (as complete
    linkage requires), against 3113 when the sentences are not split at all."""
    from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer()  # what word_tokenize applies to each sentence
    return set([token for sentence in _sentences(text) for token in words.tokenize(sentence)][:REFERENCE_TOKENS])


def _sentences(text: str) -> list[str]:
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return nltk.sent_tokenize(text) if _has_punkt() else PunktSentenceTokenizer().tokenize(text)


@functools.cache
def _has_punkt() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        print("note: NLTK's punkt_tab data is not installed (python -m nltk.downloader punkt_tab); sentences are "
              "split by NLTK's untrained Punkt for the reference's clustering tokens", file=sys.stderr)
        return False


def lowercase_words(text: str) -> set[str]:
    """crossrank's own token set: lower-cased `\\w+` words (punctuation and case ignored)."""
    return set(WORD.findall(text.lower()))


TOKENIZERS: dict[str, Callable[[str], set[str]]] = {"reference": reference_tokens, "words": lowercase_words}


# --- stage 1: duplicate detection -------------------------------------------------------------------------

def add_duplicate(docnos: Sequence[str], rng: random.Random) -> list[str]:
    """A copy of one random passage inserted at a random place of the list (the stage-1 recipe: n sampled
    passages + 1 duplicate). The Set-Encoder sees no list positions, so the place only matters for padding."""
    if not docnos:
        raise CrossrankError("add_duplicate: empty passage list (expected at least one docno)")
    docnos = list(docnos)
    docnos.insert(rng.randrange(len(docnos) + 1), rng.choice(docnos))
    return docnos


def duplicate_targets(lists: Sequence[Sequence[str]], width: int | None = None) -> Tensor:
    """[Q, D] float targets of the duplicate head: 1 for every passage whose docno (or text) occurs more than once
    in its own list (both copies: the model cannot tell which one is "the" copy), else 0; 0 at padding.
    `width` = D (default: the longest list)."""
    width = max((len(docnos) for docnos in lists), default=0) if width is None else width
    targets = torch.zeros(len(lists), width)
    for q, docnos in enumerate(lists):
        if len(docnos) > width:
            raise CrossrankError(f"duplicate_targets: list {q} has {len(docnos)} passages (expected <= {width})")
        for d, docno in enumerate(docnos):
            targets[q, d] = float(docnos.count(docno) > 1)
    return targets


def duplicate_bce(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy of the duplicate head: mean over unmasked passages of
    -[t log sigmoid(s) + (1 - t) log(1 - sigmoid(s))]. scores = duplicate logits, targets in {0, 1}, mask; all
    [Q, D]. Schlatt et al., ECIR 2025 (arXiv:2404.06912), stage 1."""
    mask = mask.bool()
    return F.binary_cross_entropy_with_logits(scores[mask], targets[mask].to(scores.dtype))


def duplicate_loss(kind: str, scores: Tensor, targets: Tensor, mask: Tensor, ranked: Tensor | None) -> Tensor:
    """The duplicate head's loss, `train.duplicate_loss`: `crossrank` = `duplicate_bce` over every passage (both
    copies positive); `reference` = webis-de/set-encoder's `RepeatCrossEntropyLoss` as it runs: only the
    originals (`ranked`, the copy left out), the original of the copied passage positive, and
    pos_weight = (logits.shape[1] - 2) / 2 with logits [Q*D, 1], i.e. -0.5; mean over those positions."""
    if kind == "crossrank" or ranked is None:
        return duplicate_bce(scores, targets, mask)
    keep = ranked.bool() & mask.bool()
    return F.binary_cross_entropy_with_logits(scores[keep], targets[keep].to(scores.dtype),
                                              pos_weight=torch.tensor(-0.5, dtype=scores.dtype, device=scores.device))


# --- the novelty variant -----------------------------------------------------------------------------------

def cluster_passages(texts: Sequence[str], threshold: float = 0.5, tokens: str = "reference") -> list[int]:
    """Cluster the passages of one query: agglomerative, complete linkage, Jaccard distance of token sets
    (`tokens`: `reference` = `reference_tokens`, as the Set-Encoder's reference; `words` = lower-cased `\\w+`);
    clusters are merged while their distance is below `threshold` (strictly, like scikit-learn's
    `distance_threshold`, which the reference uses with 0.5), so every pair inside a cluster is closer than
    `threshold`. Returns one label per passage, numbered 0, 1, ... by first appearance. Two empty passages are
    duplicates."""
    if tokens not in TOKENIZERS:
        raise CrossrankError(f"cluster_passages: unknown tokens {tokens!r} (expected one of {', '.join(TOKENIZERS)})")
    if len(texts) < 2:
        return [0] * len(texts)
    words = [TOKENIZERS[tokens](text) for text in texts]
    vocabulary = {w: i for i, w in enumerate(sorted(set().union(*words)))}
    sets = np.zeros((len(texts), max(len(vocabulary), 1)), dtype=bool)  # [D, V]
    for row, ws in enumerate(words):
        sets[row, [vocabulary[w] for w in ws]] = True
    tree = linkage(pdist(sets, "jaccard"), method="complete")
    raw = fcluster(tree, t=np.nextafter(threshold, -np.inf), criterion="distance")
    renumber: dict[int, int] = {}
    return [renumber.setdefault(int(c), len(renumber)) for c in raw]


def novelty_targets(scores: Tensor, targets: Tensor, clusters: Tensor, mask: Tensor, ties: str = "first") -> Tensor:
    """Novelty-aware targets: in every cluster only the member the model scores highest (`ties="first"`: the
    first on ties; `"all"`: every member whose score equals the cluster's max, as the Set-Encoder's
    DuplicateAwareRankNet) keeps the cluster's best target; the other members get 0, so ranking a near-duplicate
    high is a mistake.
    scores, targets [Q, D] float, clusters [Q, D] long (labels per query, any value at padding), mask [Q, D].
    Returns [Q, D] targets (0 at padding); no gradient flows through `scores`."""
    mask = mask.bool()
    clusters = torch.where(mask, clusters, 0).long()  # [Q, D]
    K = int(clusters.max()) + 1 if clusters.numel() else 1
    member = F.one_hot(clusters, K).bool() & mask[..., None]  # [Q, D, K]
    low = torch.finfo(torch.float32).min
    best = targets.float()[..., None].masked_fill(~member, low).amax(1)  # [Q, K] best target of each cluster
    per_cluster = scores.detach().float()[..., None].masked_fill(~member, low)  # [Q, D, K]
    if ties == "all":
        top = per_cluster.amax(1)  # [Q, K]
        is_winner = scores.detach().float() == top.gather(1, clusters)  # [Q, D]
    else:
        winner = per_cluster.argmax(1)  # [Q, K] first top-scored
        is_winner = winner.gather(1, clusters) == torch.arange(clusters.shape[1], device=clusters.device)  # [Q, D]
    return torch.where(is_winner & mask, best.gather(1, clusters), 0.0).to(targets.dtype)  # [Q, D]


def subtopic_qrels(qrels: Mapping[str, int], clusters: Mapping[str, int], min_rel: int = 1) -> dict[str, set[int]]:
    """Cluster "subtopic" qrels of one query: a judged passage with rel >= `min_rel` covers one subtopic, its
    cluster; other passages cover none. Passages without a cluster label (not clustered) are left out."""
    return {docno: {clusters[docno]} for docno, rel in qrels.items() if rel >= min_rel and docno in clusters}


def alpha_ndcg(ranking: Sequence[str], subtopics: Mapping[str, Collection], alpha: float = 0.99,
               k: int = 10) -> float:
    """α-nDCG@k (Clarke et al., SIGIR 2008) of one query: the gain at rank r is sum over the subtopics s of
    the passage of (1 - α)^(number of passages above r that cover s), discounted by 1 / log2(r + 1); normalised
    by the same sum for the greedy ideal ranking of all passages in `subtopics` (the usual approximation, as
    in ndeval). `ranking` = docnos best first; `subtopics` = docno -> subtopics it covers. 0 if nothing covers
    any subtopic."""
    def dcg(docnos: Sequence[str]) -> float:
        seen: dict = {}
        total = 0.0
        for r, docno in enumerate(docnos[:k], start=1):
            covered = subtopics.get(docno, ())
            total += sum((1 - alpha) ** seen.get(s, 0) for s in covered) / math.log2(r + 1)
            for s in covered:
                seen[s] = seen.get(s, 0) + 1
        return total

    ideal: list[str] = []
    pool = sorted(d for d, s in subtopics.items() if s)
    seen: dict = {}
    while pool and len(ideal) < k:
        best = max(pool, key=lambda d: sum((1 - alpha) ** seen.get(s, 0) for s in subtopics[d]))
        pool.remove(best)
        ideal.append(best)
        for s in subtopics[best]:
            seen[s] = seen.get(s, 0) + 1
    top = dcg(ideal)
    return dcg(ranking) / top if top > 0 else 0.0
