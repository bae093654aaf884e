"""Training examples from a preprocessed run: sampling candidates, targets from qrels or a teacher, and
batches tokenised by `crossrank.models.encoding`.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import torch

from crossrank.config import ROOT, DataConfig, RunConfig
from crossrank.data.datasets import resolve_source
from crossrank.models.encoding import INTERACTION_TOKEN, Pair, PairTokenizer, encode_lists
from crossrank.errors import CrossrankError
from crossrank.data.texts import load_corpus, read_topics
from crossrank.training.examples import TrainingQuery, load_meta, load_split

# ---------------------------------------------------------------------------------------------------------
# Training examples: which candidates of a query are scored together, and their targets.
#
# The stream of examples is a function of (seed, position) only: position i is query
# `order(epoch)[i % n]` of epoch `i // n`, and the candidates drawn for it come from a generator seeded with
# (seed, epoch, qid). A run that resumes at position i therefore sees exactly the examples an uninterrupted
# run would have seen, with no sampler state to save beyond the integer cursor.


@dataclasses.dataclass
class Example:
    """One query's candidates to score together, and a target per candidate (higher = better)."""

    qid: str
    docnos: list[str]
    targets: list[float]
    copy: int = -1  # position of the inserted duplicate (data.duplicate), left out of the ranking loss; -1 none


@dataclasses.dataclass
class Batch:
    """Tokenised examples. Pointwise: only real pairs are encoded, unpadded: `pairs` has one entry per True entry
    of `mask` in row-major (query, candidate) order, so `scores[mask] = model(**tokenizer.pad_list(pairs))[0]`
    fills the [Q, D] score matrix; the training loop pads them in length-sorted chunks (`train.batch_tokens`),
    not whole.
    Listwise (Set-Encoder): `inputs` are `encode_lists`' [Q, D, L] tensors and the [Q, D] `mask`."""

    inputs: dict[str, torch.Tensor]  # listwise: [Q, D, L] + mask [Q, D]; pointwise: empty (see `pairs`)
    targets: torch.Tensor  # [Q, D] float
    mask: torch.Tensor  # [Q, D] bool, False = padding (a query with fewer than D candidates)
    ranked: torch.Tensor | None = None  # [Q, D] bool: what the ranking loss sees (mask minus duplicate copies)
    duplicates: torch.Tensor | None = None  # [Q, D] float: 1 = has a copy in its list (data.duplicate)
    clusters: torch.Tensor | None = None  # [Q, D] long: Jaccard cluster of each passage (data.novelty)
    pairs: list[Pair] = dataclasses.field(default_factory=list)  # pointwise: N = mask.sum() unpadded pairs

    @property
    def num_pairs(self) -> int:
        return int(self.mask.sum())

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens: what tokens/s counts."""
        if self.pairs:
            return sum(len(ids) for ids, _ in self.pairs)
        return int(self.inputs["attention_mask"].sum()) if "attention_mask" in self.inputs else 0


def is_relevant(rel: int, level: int) -> bool:
    """A judged passage counts as relevant for sampling from grade `level` up: `data.relevant_level`, by default
    the dataset's `rel_level` recorded by preprocessing.py (1 for MS MARCO, whose qrels are all 1, as in the
    seed's code, which tests rel > 0; 2 for graded TREC-style qrels, where grade 1 is only "related")."""
    return rel >= max(level, 1)  # 0 = not resolved from a folder's meta.yaml: the seed's rel > 0


def sample_candidates(query: TrainingQuery, data: DataConfig, rng: random.Random) -> list[int] | None:
    """Positions (into `query.docnos`) of the candidates of one example; None if the query cannot give one.

    single_relevant  1 random relevant passage from the top `depth` + `num_negatives` random non-relevant ones
                     from the top `depth` (unjudged counts as non-relevant); the relevant one comes first.
                     With `add_missing_relevant` the relevant one is drawn from all of the query's judged
                     relevant passages (`with_judged_relevant` appends those the run lacks)
    top              the top `num_negatives + 1` candidates (e.g. a teacher's whole top-20)
    random           `num_negatives + 1` uniformly random candidates from the top `depth`, in rank order
    log_random       the same, drawn with weight 1 / log2(rank + 1), so higher-ranked ones are favoured
    """
    depth = min(data.depth, len(query.docnos))
    want = data.num_negatives + 1
    if data.sampling == "single_relevant":
        rels = [is_relevant(query.judged.get(d, 0), data.relevant_level) for d in query.docnos[:depth]]
        relevant = [i for i in range(depth) if rels[i]]
        if data.add_missing_relevant:  # also the relevant ones below the top depth or appended from the qrels
            relevant += [i for i in range(depth, len(query.docnos))
                         if is_relevant(query.judged.get(query.docnos[i], 0), data.relevant_level)]
        if not relevant:
            if data.keep_no_positive and depth:  # the seed: random candidates, all targets 0 (LCE's class: the first)
                return rng.sample(range(depth), min(want, depth))
            return None
        negatives = [i for i in range(depth) if not rels[i]]
        return [rng.choice(relevant)] + rng.sample(negatives, min(data.num_negatives, len(negatives)))
    if data.sampling == "top":
        return list(range(min(want, depth)))
    if data.sampling == "random":
        return sorted(rng.sample(range(depth), min(want, depth)))
    # log_random: weighted sampling without replacement (Efraimidis & Spirakis keys u^(1/w), largest first)
    keys = [rng.random() ** math.log2(rank + 2) for rank in range(depth)]  # w = 1/log2(rank+1), rank 1-based
    return sorted(sorted(range(depth), key=keys.__getitem__, reverse=True)[:want])


def with_judged_relevant(query: TrainingQuery, data: DataConfig) -> TrainingQuery:
    """The query with its judged-relevant passages that the run does not hold appended after the run's
    candidates (score -inf), so that single_relevant with `add_missing_relevant` can draw them."""
    present = set(query.docnos)
    missing = [d for d, rel in sorted(query.judged.items()) if is_relevant(rel, data.relevant_level) and d not in present]
    return dataclasses.replace(query, docnos=query.docnos + missing, scores=query.scores + [-math.inf] * len(missing))


def usable(query: TrainingQuery, data: DataConfig) -> bool:
    """Whether `sample_candidates` can give this query an example (without drawing one)."""
    if data.sampling == "single_relevant" and data.add_missing_relevant:
        return any(is_relevant(rel, data.relevant_level) for rel in query.judged.values())
    if data.sampling == "single_relevant":
        return any(is_relevant(query.judged.get(d, 0), data.relevant_level) for d in query.docnos[: data.depth]) \
            or (data.keep_no_positive and bool(query.docnos))
    return bool(query.docnos)


def enough_candidates(query: TrainingQuery, data: DataConfig) -> bool:
    """`data.min_candidates`: the top `data.depth` candidates, plus with `add_missing_relevant` the judged-relevant
    ones below it or missing from the run, number at least `min_candidates` (lightning-ir's sample_size)."""
    if not data.min_candidates:
        return True
    top = query.docnos[: data.depth]
    count = len(top)
    if data.add_missing_relevant:
        seen = set(top)
        count += sum(1 for d, rel in query.judged.items() if is_relevant(rel, data.relevant_level) and d not in seen)
    return count >= data.min_candidates


def targets_of(query: TrainingQuery, positions: list[int], data: DataConfig) -> list[float]:
    """relevance: the qrels grade (0 if unjudged); relevant: 1 if the grade counts as relevant for sampling
    (`is_relevant` at `data.relevant_level`), else 0 (BCE's labels); teacher_rank: `depth + 1 - rank` (the seed's 21 - rank for
    a top-20 teacher); teacher_score: the score stored with the ranking."""
    if data.targets == "relevance":
        return [float(query.judged.get(query.docnos[i], 0)) for i in positions]
    if data.targets == "relevant":
        return [float(is_relevant(query.judged.get(query.docnos[i], 0), data.relevant_level)) for i in positions]
    if data.targets == "teacher_rank":
        return [float(data.depth - i) for i in positions]  # position i is rank i + 1
    return [float(query.scores[i]) for i in positions]


class TrainingData:
    """The training queries with their texts, as a deterministic, endless stream of examples (see above)."""

    def __init__(self, queries: list[TrainingQuery], topics: dict[str, str], passages: dict[str, str],
                 data: DataConfig, seed: int):
        self.data, self.seed, self.topics, self.passages = data, seed, topics, passages
        # a query that cannot give an example (single_relevant without a relevant passage) is dropped up front,
        # so every position of the stream yields one
        if data.sampling == "single_relevant" and data.add_missing_relevant:
            queries = [with_judged_relevant(q, data) for q in queries]
        self.queries = [q for q in queries if usable(q, data) and enough_candidates(q, data)]
        self.dropped = len(queries) - len(self.queries)
        self.without_positive = 0 if not data.keep_no_positive or data.sampling != "single_relevant" else sum(
            1 for q in self.queries if not any(is_relevant(q.judged.get(d, 0), data.relevant_level)
                                                for d in q.docnos[: data.depth]))
        if not self.queries:
            raise CrossrankError(f"training data: none of the {len(queries)} queries has a usable example "
                                 f"(sampling {data.sampling} needs a passage judged rel>={data.relevant_level} in the top "
                                 f"{data.depth} of each query)")
        self._order: tuple[int, list[int]] = (-1, [])
        self._clusters: dict[tuple[str, ...], list[int]] = {}  # data.novelty: computed once per candidate list

    def __len__(self) -> int:
        return len(self.queries)

    def order(self, epoch: int) -> list[int]:
        """The shuffled query order of one epoch (cached: consecutive positions share it)."""
        if self._order[0] != epoch:
            order = list(range(len(self.queries)))
            random.Random(f"{self.seed}/order/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def example(self, position: int) -> Example:
        epoch, index = divmod(position, len(self.queries))
        query = self.queries[self.order(epoch)[index]]
        rng = random.Random(f"{self.seed}/{epoch}/{query.qid}")
        positions = sample_candidates(query, self.data, rng)
        example = Example(query.qid, [query.docnos[i] for i in positions], targets_of(query, positions, self.data))
        if self.data.duplicate:  # Set-Encoder stage 1: n sampled passages + a copy of one of them
            from crossrank.novelty import add_duplicate

            docnos = add_duplicate(example.docnos, rng)
            target = dict(zip(example.docnos, example.targets))
            copy = next(i for i, d in enumerate(docnos) if d in docnos[:i])  # the second occurrence
            example = Example(query.qid, docnos, [target[d] for d in docnos], copy)
        return example

    def clusters(self, docnos: list[str]) -> list[int]:
        """Jaccard clusters of a candidate list (data.novelty), computed once per distinct list."""
        from crossrank.novelty import cluster_passages

        key = tuple(docnos)
        if key not in self._clusters:
            self._clusters[key] = cluster_passages([self.passages[d] for d in docnos])
        return self._clusters[key]

    def batch(self, start: int, count: int, tokenizer: PairTokenizer, listwise: bool = False) -> Batch:
        """The examples at stream positions start .. start + count - 1, tokenised (`listwise`: whole lists for
        the Set-Encoder)."""
        examples = [self.example(p) for p in range(start, start + count)]
        batch = collate(examples, self.topics, self.passages, tokenizer, listwise)
        if self.data.novelty:
            batch.clusters = torch.zeros(batch.mask.shape, dtype=torch.long)  # [Q, D]
            for row, example in enumerate(examples):
                batch.clusters[row, : len(example.docnos)] = torch.tensor(self.clusters(example.docnos))
        return batch


def collate(examples: list[Example], topics: dict[str, str], passages: dict[str, str],
            tokenizer: PairTokenizer, listwise: bool = False) -> Batch:
    """Tokenise examples and pad them into [Q, D] targets and mask (D = the longest candidate list): as pairs
    for a pointwise model, as whole lists (`crossrank.models.encoding.encode_lists`) for the Set-Encoder. A list
    with a duplicate also gets the duplicate head's targets and leaves the copy out of `ranked`."""
    width = max(len(e.docnos) for e in examples)
    targets = torch.zeros(len(examples), width)  # [Q, D]
    mask = torch.zeros(len(examples), width, dtype=torch.bool)  # [Q, D]
    for row, example in enumerate(examples):
        targets[row, : len(example.targets)] = torch.tensor(example.targets)
        mask[row, : len(example.docnos)] = True
    if listwise:
        inputs = encode_lists(tokenizer, tokenizer.fields.token_to_id(INTERACTION_TOKEN),
                              [topics[e.qid] for e in examples], [[passages[d] for d in e.docnos] for e in examples])
        batch = Batch(inputs, targets, mask)
    else:  # padded later, per length-sorted chunk: padding the whole micro-batch to its longest pair is waste
        batch = Batch({}, targets, mask, pairs=tokenizer.encode([topics[e.qid] for e in examples for _ in e.docnos],
                                                               [passages[d] for e in examples for d in e.docnos]))
    if any(e.copy >= 0 for e in examples):
        from crossrank.novelty import duplicate_targets

        batch.duplicates = duplicate_targets([e.docnos for e in examples], width)  # [Q, D]
        batch.ranked = mask.clone()
        for row, example in enumerate(examples):
            if example.copy >= 0:
                batch.ranked[row, example.copy] = False
    return batch


# ---------------------------------------------------------------------------------------------------------
# Loading a preprocessed folder (data/<dataset>/<objective>/) with the texts it needs


def training_folder(cfg: RunConfig) -> Path:
    """`data.train` if set, else data/<dataset>/<CL or KD> (what preprocessing.py writes; BCE reads CL's)."""
    if cfg.data.train:
        return Path(resolve_source(cfg.data.train))
    return ROOT / "data" / cfg.data.dataset / ("KD" if cfg.train.objective == "KD" else "CL")


def load_training_data(cfg: RunConfig) -> tuple[TrainingData, list[TrainingQuery]]:
    """Training stream and validation queries (cut to the top `eval.depth`, judged ones only) from the
    preprocessed folder; texts are read once, only for the passages that can be used."""
    folder = training_folder(cfg)
    meta = load_meta(folder)
    # 0 = the dataset's own threshold, recorded by preprocessing.py (older folders: 1)
    data_cfg = dataclasses.replace(cfg.data, relevant_level=cfg.data.relevant_level or int(meta.get("rel_level", 1)))
    train, valid = load_split(folder, "train"), load_split(folder, "valid")
    valid = [dataclasses.replace(q, docnos=q.docnos[: cfg.eval.depth], scores=q.scores[: cfg.eval.depth])
             for q in valid if q.judged and q.docnos]
    needed = {d for q in train for d in q.docnos[: cfg.data.depth]} | {d for q in valid for d in q.docnos}
    if cfg.data.add_missing_relevant:  # positives may come from the qrels, wherever the run ranked them
        needed |= {d for q in train for d, rel in q.judged.items() if is_relevant(rel, data_cfg.relevant_level)}
    for key in ("topics", "corpus"):
        if not meta.get(key):
            raise CrossrankError(f"{folder / 'meta.yaml'}: no {key} source (expected {key}: <path or irds:id>)")
    topics = read_topics(resolve_source(str(meta["topics"])))
    missing = [q.qid for q in train + valid if q.qid not in topics]
    if missing:
        raise CrossrankError(f"{meta['topics']}: {len(missing)} training/validation qids have no text "
                             f"(e.g. {', '.join(missing[:5])})")
    passages = load_corpus(resolve_source(str(meta["corpus"])), docnos=needed)
    data = TrainingData(train, topics, passages, data_cfg, cfg.train.seed)
    return data, valid


def list_size(data: DataConfig) -> str:
    """What one query contributes to a micro-batch, for the start line (the CL defaults, 1 + 99, surprise)."""
    if data.sampling == "single_relevant":
        return f"1 relevant + up to {data.num_negatives} negatives from the top {data.depth}"
    if data.sampling == "top":
        return f"the top {data.num_negatives + 1} candidates"
    return f"{data.num_negatives + 1} {data.sampling.replace('_', '-')} candidates from the top {data.depth}"
