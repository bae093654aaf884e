"""Qrels readers: TREC `qid 0 docno rel` and BEIR `query-id corpus-id score` TSV."""
from __future__ import annotations

import os
from crossrank.data.files import BadLines, numbered_lines
from crossrank.data.irds import irds_errors, is_irds, open_irds
from crossrank.data.files import beir_member
from crossrank.errors import CrossrankError


# qid -> {docno: relevance}
Qrels = dict[str, dict[str, int]]


# ---------------------------------------------------------------------------------------------------------
# Qrels


def read_qrels(path: str | os.PathLike, lenient: bool = False) -> Qrels:
    """Read qrels: TREC `qid 0 docno rel` or BEIR TSV `query-id corpus-id score` (header optional); BEIR
    folders (`qrels/test.tsv` or `qrels.tsv`) and `irds:<id>` too. Relevance must be an integer; the same
    (qid, docno) twice is an error."""
    if is_irds(path):
        dataset = open_irds(str(path))
        if not dataset.has_qrels():
            raise CrossrankError(f"{path}: this ir_datasets id has no qrels")
        qrels: Qrels = {}
        with irds_errors(str(path)):
            for q in dataset.qrels_iter():
                qrels.setdefault(q.query_id, {})[q.doc_id] = int(q.relevance)
        return qrels
    path = beir_member(path, ("qrels/test.tsv", "qrels.tsv"))
    bad = BadLines(path, "qrels", lenient)
    qrels = {}
    for number, line in numbered_lines(path):
        parts = line.split()
        if number == 1 and parts[:2] == ["query-id", "corpus-id"]:
            continue  # BEIR header
        if len(parts) == 4:
            qid, _, docno, rel = parts
        elif len(parts) == 3:
            qid, docno, rel = parts
        else:
            bad(number, f"qrels line has {len(parts)} columns (expected 4: qid 0 docno rel, "
                        f"or 3: query-id corpus-id score; got {line[:80]!r})")
            continue
        try:
            rel_value = int(rel)
        except ValueError:
            bad(number, f"relevance is not an integer (expected e.g. 0..3, got {rel!r})")
            continue
        judged = qrels.setdefault(qid, {})
        if docno in judged:
            bad(number, f"docno {docno} is judged twice for query {qid} (expected one judgement per pair)")
            continue
        judged[docno] = rel_value
    bad.close()
    if not qrels:
        raise CrossrankError(f"{path}: the qrels are empty (expected at least one judgement)")
    return qrels
