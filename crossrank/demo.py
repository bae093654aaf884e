"""A small, deterministic, synthetic test collection with real learnable signal, for the offline demo.

The collection is built from real English words so that a pretrained encoder (MiniLM) starts with useful
semantics. Every query asks about a *theme* (two words of its vocabulary) under an *aspect* ("coral reef
history"). Every document has a theme, an aspect and a focus, and the graded judgement follows from them:

    3  same theme, same aspect, the document is about the theme (strong focus)
    2  same theme, same aspect, the theme is a side remark (weak focus)
    1  same theme, another aspect
    0  another theme

What makes it a ranking problem: relevant documents often use *other* words of the theme than the query does
(BM25 misses them), and for every query there are distractors about another theme that repeat the query's
aspect word and one of its theme words (BM25 ranks them high). A cross-encoder can learn theme coherence and
aspect match; BM25 cannot.

The simulated teacher (for KD) ranks a query's 20 candidates by their true grade plus Gaussian noise, the way
an LLM's ranking is good but imperfect. Files written to `data/demo/` (`python -m crossrank demo`):

    corpus.tsv          docno<TAB>text
    topics.train.tsv    qid<TAB>text       (training queries; preprocessing holds out some for validation)
    topics.test.tsv     qid<TAB>text       (evaluation queries, disjoint from training)
    qrels.train.txt     qid 0 docno rel    (every same-theme document and every distractor judged)
    qrels.test.txt      qid 0 docno rel
    teacher.train.run   TREC run of the teacher's top-20 per training query, score = 21 - rank
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from crossrank import cli
from crossrank.config import ROOT
from crossrank.data.atomic import atomic_write
from crossrank.data.outputs import refuse_overwriting_inputs, same_file
from crossrank.data.runs import format_run_lines, sort_ranking

THEMES = {
    "ocean": "sea wave tide coral reef fish shore salt whale boat",
    "forest": "tree wood pine oak leaf moss timber canopy bark trail",
    "space": "planet star orbit rocket moon galaxy comet telescope astronaut satellite",
    "kitchen": "cook oven bread recipe flour spice knife soup bake meal",
    "music": "song guitar piano melody rhythm drum concert choir violin chord",
    "medicine": "doctor patient disease vaccine hospital nurse therapy surgery drug clinic",
    "football": "goal stadium player coach league match referee striker penalty team",
    "finance": "bank loan interest stock investor market bond credit money budget",
    "weather": "rain storm cloud wind snow thunder forecast humidity frost climate",
    "computer": "software program code processor memory keyboard laptop server algorithm database",
    "farming": "farm crop harvest tractor soil wheat cattle barn seed irrigation",
    "architecture": "building bridge tower concrete column facade roof arch architect steel",
    "law": "court judge lawyer trial verdict contract statute jury appeal lawsuit",
    "travel": "airport flight hotel passport luggage tourist journey ticket train voyage",
    "art": "painting canvas sculpture museum gallery portrait brush artist color sketch",
    "education": "school teacher student exam lesson classroom university lecture homework degree",
    "volcano": "lava eruption magma crater ash volcanic ember quake basalt vent",
    "birds": "eagle sparrow nest feather wing owl parrot flock beak migration",
    "cars": "engine wheel brake tire fuel driver garage motor highway vehicle",
    "chess": "pawn knight bishop rook queen king checkmate board gambit opening",
    "coffee": "espresso bean roast brew caffeine barista mug latte grinder cafe",
    "gardening": "flower rose tulip compost shovel garden weed bloom pot hedge",
    "mountains": "peak summit climb glacier ridge slope altitude cliff valley hiker",
    "energy": "solar turbine battery power grid electricity voltage reactor fuel panel",
    "photography": "camera lens shutter photo exposure tripod flash portrait zoom film",
    "dentistry": "tooth dentist cavity enamel gum filling braces molar floss plaque",
    "rivers": "river stream delta flood dam canal bank current estuary waterfall",
    "insects": "bee ant butterfly beetle hive wasp larva moth swarm pollen",
    "cinema": "film actor director scene script studio premiere cinema camera audience",
    "history": "empire king war castle treaty dynasty battle ancient ruin knight",
}
ASPECTS = ["history", "cost", "safety", "design", "health", "future", "rules", "tools", "training", "environment"]
FILLER = ("people often ask about this topic . many sources agree on the basics . it is a common subject . "
          "the details below are worth reading . experts have written about it for years .").split(" . ")

N_TRAIN, N_TEST = 200, 50
DOCS_PER_QUERY = {(3, "strong"): 2, (2, "weak"): 2, (1, "other"): 2}  # relevant docs made for each query
DISTRACTORS_PER_QUERY = 3
BACKGROUND_DOCS = 600
TEACHER_DEPTH = 20
TEACHER_NOISE = 0.7


def _sentence(rng: random.Random, theme_words: list[str], aspect: str | None, focus: str) -> str:
    """A document as a few short sentences. Strong focus: many theme words; weak: theme words once, at the end."""
    words = rng.sample(theme_words, 4 if focus == "strong" else 2)
    parts = []
    if focus == "strong":
        parts.append(f"this text is about the {words[0]} and the {words[1]}")
        parts.append(f"the {words[2]} is closely linked to the {words[3]}")
    else:
        parts.append(rng.choice(FILLER).strip())
        parts.append(f"one remark mentions a {words[0]} near a {words[1]}")
    if aspect:
        parts.append(f"the main point concerns {aspect} and questions of {aspect}")
    parts.append(rng.choice(FILLER).strip())
    return " . ".join(parts) + " ."


Query = tuple[str, str, str, str, tuple[str, str]]  # qid, theme, aspect, text, the two theme words in it
Doc = tuple[str, str, str | None, str, str]  # docno, theme, aspect, focus, text


def generate(out: Path, seed: int = 13) -> dict[str, int]:
    """Write the demo collection to `out`; return the counts. Same seed, same files, byte for byte."""
    rng = random.Random(seed)
    themes = {name: words.split() for name, words in THEMES.items()}
    queries = _queries(rng, themes)
    docs = _documents(rng, themes, queries)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "corpus.tsv") as f:
        f.writelines(f"{docno}\t{text}\n" for docno, _, _, _, text in docs)
    train, test = queries[:N_TRAIN], queries[N_TRAIN:]
    for name, split in (("train", train), ("test", test)):
        with atomic_write(out / f"topics.{name}.tsv") as f:
            f.writelines(f"{qid}\t{text}\n" for qid, _, _, text, _ in split)
    words = [set(text.split()) for *_, text in docs]
    n_qrels = sum(_write_qrels(out / f"qrels.{name}.txt", split, docs, words)
                  for name, split in (("train", train), ("test", test)))
    _write_teacher(out / "teacher.train.run", rng, train, docs, words)
    return {"docs": len(docs), "train_queries": len(train), "test_queries": len(test), "qrels": n_qrels}


def _queries(rng: random.Random, themes: dict[str, list[str]]) -> list[Query]:
    """Each query: (theme, two of its words, aspect); all distinct, train first, then test."""
    combos = [(t, a) for t in themes for a in ASPECTS]
    rng.shuffle(combos)
    queries = []
    for number, (theme, aspect) in enumerate(combos[: N_TRAIN + N_TEST]):
        w1, w2 = rng.sample(themes[theme], 2)
        queries.append((f"q{number + 1}", theme, aspect, f"{w1} {w2} {aspect}", (w1, w2)))
    return queries


def _documents(rng: random.Random, themes: dict[str, list[str]], queries: list[Query]) -> list[Doc]:
    """Per query its relevant and related documents and distractors, then the background documents."""
    docs: list[Doc] = []

    def add_doc(theme: str, aspect: str | None, focus: str, words: list[str]) -> None:
        docs.append((f"d{len(docs) + 1}", theme, aspect, focus, _sentence(rng, words, aspect, focus)))

    for _, theme, aspect, _, query_words in queries:
        for (_, focus), count in DOCS_PER_QUERY.items():
            for _ in range(count):
                # half of the relevant documents avoid the query's own words: BM25 cannot match them
                pool = themes[theme] if rng.random() < 0.5 else [w for w in themes[theme] if w not in query_words]
                doc_aspect = aspect if focus != "other" else rng.choice([a for a in ASPECTS if a != aspect])
                add_doc(theme, doc_aspect, "strong" if focus == "other" else focus, pool)
        for _ in range(DISTRACTORS_PER_QUERY):
            other = rng.choice([t for t in themes if t != theme])
            # another theme's text that repeats the query's aspect and one of its words
            add_doc(other, aspect, "strong", themes[other][:6] + [query_words[0]] * 4)
    for _ in range(BACKGROUND_DOCS):
        theme = rng.choice(list(themes))
        add_doc(theme, rng.choice(ASPECTS + [None]), rng.choice(["strong", "weak"]), themes[theme])
    return docs


def _grade(query: Query, doc: Doc) -> int:
    """3: same theme and aspect, strong focus; 2: weak focus; 1: same theme, other aspect; 0: other theme."""
    (_, q_theme, q_aspect, _, _), (_, d_theme, d_aspect, focus, _) = query, doc
    if d_theme != q_theme:
        return 0
    if d_aspect != q_aspect:
        return 1
    return 3 if focus == "strong" else 2


def _judged(query: Query, docs: list[Doc], words: list[set[str]]) -> list[Doc]:
    """Every same-theme document, and other-theme documents sharing the query's first word."""
    return [d for d, doc_words in zip(docs, words) if d[1] == query[1] or query[4][0] in doc_words]


def _write_qrels(path: Path, queries: list[Query], docs: list[Doc], words: list[set[str]]) -> int:
    """The graded qrels of `queries`; returns the number of lines."""
    lines = [f"{query[0]} 0 {doc[0]} {_grade(query, doc)}\n" for query in queries
             for doc in _judged(query, docs, words)]
    with atomic_write(path) as f:
        f.writelines(lines)
    return len(lines)


def _write_teacher(path: Path, rng: random.Random, queries: list[Query], docs: list[Doc],
                   words: list[set[str]]) -> None:
    """The simulated LLM teacher's top-`TEACHER_DEPTH` of every query: noisy grades, best first."""
    with atomic_write(path) as f:
        for query in queries:
            judged = _judged(query, docs, words)
            # the teacher sees a first stage's candidates: all the good documents and then some
            good = [d for d in judged if _grade(query, d) >= 2][: TEACHER_DEPTH // 2]
            rest = [d for d in judged if d not in good]
            candidates = good + rng.sample(rest, min(TEACHER_DEPTH - len(good), len(rest)))
            ranking = sort_ranking([(d[0], _grade(query, d) + rng.gauss(0, TEACHER_NOISE)) for d in candidates])
            f.writelines(format_run_lines(query[0], [(docno, float(len(ranking) - i)) for i, (docno, _) in
                                                     enumerate(ranking)], "demo-teacher"))


FILES = ("corpus.tsv", "topics.train.tsv", "topics.test.tsv", "qrels.train.txt", "qrels.test.txt", "teacher.train.run")


def _refuse_overwriting_inputs(out: Path) -> None:
    """`--out` must be a folder, and none of the files written there may be an input of a configured dataset
    (configs/datasets/), apart from the demo's own files in data/demo/, which this command exists to (re)write."""
    from crossrank.data.datasets import load_dataset
    from crossrank.errors import CrossrankError

    if out.exists() and not out.is_dir():
        raise CrossrankError(f"{out}: --out is a file (expected a folder for the demo collection's files)")
    own = [ROOT / "data" / "demo" / name for name in FILES]
    inputs = []
    for yaml_file in sorted((ROOT / "configs" / "datasets").glob("*.yaml")):
        try:
            dataset = load_dataset(str(yaml_file))
        except (CrossrankError, OSError):  # a dataset list (indomain) or a broken config: not this command's
            continue
        inputs += [(what, path) for what, path in dataset.inputs()
                   if not any(same_file(path, mine) for mine in own)]
    refuse_overwriting_inputs([(f"--out's {name}", out / name) for name in FILES], inputs)


def main() -> int:
    parser = cli.ArgumentParser(description="Generate the synthetic demo collection.")
    parser.add_argument("--out", default=str(ROOT / "data" / "demo"), help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=cli.int_in(0), default=13)
    args = parser.parse_args()
    _refuse_overwriting_inputs(Path(args.out))
    counts = generate(Path(args.out), args.seed)
    print(f"demo collection in {args.out}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
