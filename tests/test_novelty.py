"""Duplicate targets, Jaccard clustering, Novelty-Aware RankNet and α-nDCG against hand-computed values."""
from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import SHARED_DATA, na_rank_net
from crossrank.errors import CrossrankError
from crossrank.novelty import (add_duplicate, alpha_ndcg, cluster_passages, duplicate_bce, duplicate_targets,
                               novelty_targets, reference_tokens, subtopic_qrels)
from crossrank.training.losses import rank_net

T = torch.tensor
softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731


def test_duplicate_targets_and_bce():
    lists = [["a", "b", "a"], ["c", "d"]]
    targets = duplicate_targets(lists)
    assert targets.tolist() == [[1, 0, 1], [0, 0, 0]]
    assert duplicate_targets(lists, width=4).shape == (2, 4)
    with pytest.raises(CrossrankError, match="expected <= 2"):
        duplicate_targets(lists, width=2)
    logits = T([[0.0, 2.0, -1.0], [1.0, 50.0, -50.0]])
    mask = T([[True, True, True], [True, False, False]])
    expected = (math.log(2) + softplus(2) + softplus(1) + softplus(1)) / 4
    assert duplicate_bce(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_add_duplicate():
    docnos = add_duplicate(["a", "b", "c"], random.Random(1))
    assert len(docnos) == 4 and sorted(set(docnos)) == ["a", "b", "c"]
    assert duplicate_targets([docnos]).sum() == 2
    with pytest.raises(CrossrankError, match="empty"):
        add_duplicate([], random.Random(1))


def test_clustering_by_jaccard_distance():
    texts = ["the cat sat on the mat",       # {the cat sat on mat}
             "The cat sat on a mat!",        # 1 - 5/6 = 0.17 from 0
             "dogs bark loudly",
             "dogs bark loudly at night",    # 1 - 3/5 = 0.4 from 2
             "the dogs sat"]                 # 0.67 from 0, 0.8 from 2
    assert cluster_passages(texts, tokens="words") == [0, 0, 1, 1, 2]
    # The reference's NLTK tokens keep case and punctuation: {The cat sat on a mat !} is 1 - 4/8 = 0.5 from
    # {the cat sat on mat}, which is not below 0.5, so it is a cluster of its own.
    assert cluster_passages(texts) == [0, 1, 2, 2, 3]
    # Exactly 0.5 is not merged (strict threshold); 0.4 is.
    assert cluster_passages(["a b c", "a b d"]) == [0, 1]
    assert cluster_passages(["a b c d", "a b c e"]) == [0, 0]
    # Complete linkage: B is close to A (0.33) and to C (0.43), but A-C = 0.625, so C stays alone
    # (single linkage would chain all three).
    a, b, c = "w1 w2 w3 w4 w8", "w1 w2 w3 w4 w5", "w2 w3 w4 w5 w6 w7"
    assert cluster_passages([c, a, b]) == [0, 1, 1]
    assert cluster_passages(["", "", "x"]) == [0, 0, 1]
    assert cluster_passages(["only one"]) == [0] and cluster_passages([]) == []


def test_novelty_targets_by_hand():
    scores = T([[3.0, 1.0, 2.0, 0.5], [1.0, 4.0, 9.0, 9.0]])
    targets = T([[1.0, 5.0, 2.0, 0.0], [3.0, 1.0, 7.0, 7.0]])
    clusters = T([[0, 0, 1, 1], [0, 0, 0, 5]])  # 5: garbage at padding
    mask = T([[True, True, True, True], [True, True, False, False]])
    # Cluster 0 of query 0: best target 5 goes to the top-scored member (index 0); cluster 1: 2 to index 2.
    # Query 1: the padded passage (score 9, target 7) takes part in nothing.
    assert novelty_targets(scores, targets, clusters, mask).tolist() == [[5, 0, 2, 0], [0, 3, 0, 0]]


def test_na_rank_net_by_hand():
    scores = T([[2.0, 1.0, 0.0], [0.0, 1.0, 5.0]], requires_grad=True)
    targets = T([[3.0, 2.0, 1.0], [1.0, 2.0, 9.0]])
    clusters = T([[0, 0, 1], [0, 1, 0]])
    full = T([[True, True, True], [True, True, True]])
    padded = T([[True, True, True], [True, True, False]])
    # Query 0: novelty targets [3, 0, 1]: pairs (0>1), (0>2), (2>1).
    query0 = [softplus(1 - 2), softplus(0 - 2), softplus(1 - 0)]
    # Query 1 padded: targets [1, 2, -]: pair (1>0). Unpadded: cluster 0 = {0, 2}, passage 2 scores higher and
    # takes 9; targets [0, 2, 9]: pairs (1>0), (2>0), (2>1).
    assert na_rank_net(scores, targets, padded, clusters).item() == pytest.approx(
        (sum(query0) + softplus(0 - 1)) / 4, rel=1e-6)
    assert na_rank_net(scores, targets, full, clusters).item() == pytest.approx(
        (sum(query0) + softplus(0 - 1) + softplus(0 - 5) + softplus(1 - 5)) / 6, rel=1e-6)
    na_rank_net(scores, targets, padded, clusters).backward()
    assert scores.grad[1, 2] == 0  # padding gets no gradient
    # Plain RankNet on the original targets differs: (1 > 2) is a pair there, not (2 > 1).
    plain = rank_net(scores, targets, full).item()
    assert plain == pytest.approx((softplus(-1) + softplus(-2) + softplus(-1) + softplus(-1) + softplus(-5)
                                   + softplus(-4)) / 6, rel=1e-6)
    assert rank_net(scores, torch.zeros(2, 3), full).item() == 0.0  # no pair with t_i > t_j


def test_alpha_ndcg_by_hand():
    subtopics = {"d1": {"A"}, "d2": {"A"}, "d3": {"B"}}
    # α = 0.5: gains 1, 0.5, 1 at ranks 1..3; ideal (greedy) d1, d3, d2: 1, 1, 0.5.
    dcg = 1 + 0.5 / math.log2(3) + 1 / 2
    ideal = 1 + 1 / math.log2(3) + 0.5 / 2
    assert alpha_ndcg(["d1", "d2", "d3"], subtopics, alpha=0.5) == pytest.approx(dcg / ideal)
    # α = 0.99 (the paper's): a second passage of the same subtopic is almost worthless.
    dcg = 1 + 0.01 / math.log2(3) + 1 / 2
    ideal = 1 + 1 / math.log2(3) + 0.01 / 2
    assert alpha_ndcg(["d1", "d2", "d3"], subtopics) == pytest.approx(dcg / ideal)
    assert alpha_ndcg(["d1", "d3", "d2"], subtopics) == pytest.approx(1.0)
    # Unjudged passages gain nothing; the cut-off is k.
    assert alpha_ndcg(["x"] * 10 + ["d1"], subtopics) == 0.0
    assert alpha_ndcg(["x", "d3"], subtopics, k=2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert alpha_ndcg(["d1"], {}) == 0.0


def test_subtopic_qrels_from_clusters():
    qrels = {"d1": 2, "d2": 1, "d3": 0, "d4": 3}
    clusters = {"d1": 0, "d2": 0, "d3": 1}
    assert subtopic_qrels(qrels, clusters) == {"d1": {0}, "d2": {0}}
    assert subtopic_qrels(qrels, clusters, min_rel=2) == {"d1": {0}}


SHARED_DL19 = SHARED_DATA / "trec-dl"


@pytest.mark.skipif(not (SHARED_DL19 / "dl19" / "corpus.jsonl").is_file(), reason="needs ../shared/data/trec-dl")
def test_reference_tokens_agree_with_the_reference_clusters_of_dl19():
    """The reference's own DL19 subtopic qrels (webis-de/set-encoder data/qrels, cluster in the second column):
    complete linkage puts two passages in one cluster only if their distance is below 0.5, so with the same
    tokens every such pair must be closer than 0.5. Of the pairs whose texts are here, all but 2 of 1611 are."""
    import collections
    import itertools
    import json

    texts = {}
    with open(SHARED_DL19 / "dl19" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts[str(record.get("docno") or record.get("_id"))] = record["text"]
    clusters: dict[str, dict[str, str]] = collections.defaultdict(dict)
    qrels = SHARED_DL19 / "original" / "set-encoder" / "data" / "qrels" / "msmarco-passage-trec-dl-2019-judged.qrels"
    for line in qrels.read_text().splitlines():
        qid, cluster, docno, _ = line.split()
        clusters[qid][docno] = cluster
    close = pairs = 0
    for docs in clusters.values():
        tokens = {d: reference_tokens(texts[d]) for d in docs if d in texts}
        for a, b in itertools.combinations(tokens, 2):
            if docs[a] == docs[b]:
                pairs += 1
                close += 1 - len(tokens[a] & tokens[b]) / len(tokens[a] | tokens[b]) < 0.5
    assert pairs > 1500 and close >= pairs - 3
