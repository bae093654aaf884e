"""What a re-ranking reads: a run's top-k per query with the query and passage texts."""
from __future__ import annotations

import dataclasses


from crossrank.errors import CrossrankError
from crossrank.data.runs import Run, load_run, run_problems
from crossrank.data.texts import load_corpus, read_topics


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Candidates:
    """What is re-ranked: the top-`depth` docnos per query, the query texts and the passage texts."""

    run: Run  # qid -> [(docno, first-stage score)], best first
    queries: dict[str, str]  # qid -> text
    texts: dict[str, str]  # docno -> text
    notes: list[str] = dataclasses.field(default_factory=list)
    # as read by `load_candidates`, for evaluating the first stage without reading the files again:
    first_stage: Run | None = None  # the run's top `depth` before --lenient skipped anything (else `run`)
    topics: dict[str, str] | None = None  # every topic of the topics file (the judged queries are cut to them)

    @property
    def num_pairs(self) -> int:
        return sum(len(r) for r in self.run.values())


def load_candidates(run_path: str, topics: str, corpus: str, depth: int, lenient: bool = False) -> Candidates:
    """Read and check the run, topics and corpus. Strict: qids missing from the topics, docnos missing from the
    corpus, duplicate lines and an empty run are errors with counts; `lenient` skips them and notes counts."""
    notes: list[str] = []
    try:
        first_stage = run = load_run(run_path, depth=depth, lenient=lenient)
    except CrossrankError as e:
        if "appears twice" in str(e):  # say how many, not only where the first one is
            duplicates = run_problems(run_path).get("duplicate", 0)
            raise CrossrankError(f"{e}; {duplicates} duplicate (qid, docno) lines in all (--lenient skips them)") \
                from None
        raise
    all_topics = read_topics(topics)
    missing_q = [q for q in run if q not in all_topics]
    if missing_q:
        message = (f"{run_path}: {len(missing_q)} of {len(run)} queries are not in the topics {topics} "
                   f"(e.g. {', '.join(missing_q[:5])})")
        if not lenient:
            raise CrossrankError(f"{message} (expected every qid of the run in the topics; --lenient skips them)")
        notes.append(f"{message}: skipped (--lenient)")
        run = {q: r for q, r in run.items() if q in all_topics}
    wanted = {docno for ranking in run.values() for docno, _ in ranking}
    texts = load_corpus(corpus, wanted, missing_ok=True)  # missing docnos are counted and reported below
    missing_d = wanted - texts.keys()
    if missing_d:
        n_lines = sum(d in missing_d for r in run.values() for d, _ in r)
        message = (f"{run_path}: {len(missing_d)} of {len(wanted)} docnos ({n_lines} run lines) are not in the "
                   f"corpus {corpus} (e.g. {', '.join(sorted(missing_d)[:5])})")
        if not lenient:
            raise CrossrankError(f"{message} (expected every docno of the run in the corpus; --lenient skips them)")
        notes.append(f"{message}: skipped (--lenient)")
        run = {q: [(d, s) for d, s in r if d not in missing_d] for q, r in run.items()}
        run = {q: r for q, r in run.items() if r}
    if not run:
        raise CrossrankError(f"{run_path}: nothing left to re-rank (expected queries with candidates)")
    return Candidates(run, {q: all_topics[q] for q in run}, texts, notes, first_stage, all_topics)
