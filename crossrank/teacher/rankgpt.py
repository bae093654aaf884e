"""RankGPT's prompts and answers: sliding windows, the conversation, its token count, the answer's permutation.

RankGPT (Sun et al., "Is ChatGPT Good at Search? Investigating Large Language Models as Re-Ranking Agents",
EMNLP 2023, arXiv:2304.09542) re-ranks a query's top-k candidates with a chat model. A window of `window`
passages is shown as one message per numbered passage; the model answers `[3] > [1] > [2] ...`. Windows slide
from the bottom of the list to the top by `step`, so good passages bubble up: with k=100, window 20, step 10
the windows are ranks 81-100, 71-90, ..., 1-20 (9 requests per query). `window >= k` is one request.

Prompt size: passages are cut to a word budget (RankGPT's 300 words) that shrinks until the conversation plus
the answer's token reserve fits `context_size`. Tokens are counted with the model's tokenizer when one is
available locally (a folder or the Hugging Face cache; its chat template when it has one), else estimated:
    tokens(text) = max(chars / 4, words * 4 / 3)    (OpenAI's two rules of thumb for English; the larger)
    tokens(conversation) = sum over messages of tokens(content) + 4, plus 3 for the answer's priming.
`parse_permutation` reads the teacher's answers, ours (`crossrank.teacher.run`) and RankGPT's published ones
(`crossrank.training.preprocessing`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from crossrank.errors import CrossrankError
from crossrank.teacher.config import TeacherConfig

SYSTEM = "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."
NOVELTY_SYSTEM = ("You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to "
                  "the query and their novelty.")


def sliding_windows(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """[start, end) windows over ranks 0..n-1, from the bottom of the list up; the last one starts at 0.

    RankGPT's loop stops once a window would start above the list, so with n=25, window 20, step 10 it never
    compares the top 5 with anything; here the last window is clipped to start at 0 instead."""
    spans = []
    end = n
    while True:
        start = max(end - window, 0)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= step


def build_messages(query: str, passages: list[str], words: int, novelty: bool = False) -> list[dict[str, str]]:
    """RankGPT's conversation: system role, the task, one user message per numbered passage (cut to `words`
    words) each acknowledged by the assistant, then the instruction asking for `[i] > [j]` output."""
    num = len(passages)
    if novelty:
        task = (f"I will provide you with {num} passages, each indicated by number identifier []. \nRank the "
                f"passages based on their relevance to query: {query}, and on their novelty: a passage that repeats "
                f"the information of a passage ranked above it is not novel.")
        instruction = (f"Search Query: {query}. \nRank the {num} passages above based on their relevance to the "
                       f"search query and their novelty. The most relevant passages should be listed first; a "
                       f"passage that is a near-duplicate of a passage ranked above it, or repeats its information, "
                       f"must go to the bottom, below every passage that adds new information. The passages should "
                       f"be listed in descending order using identifiers. The output format should be [] > [], "
                       f"e.g., [1] > [2]. Only respond with the ranking results, do not say any word or explain.")
    else:
        task = (f"I will provide you with {num} passages, each indicated by number identifier []. \nRank the "
                f"passages based on their relevance to query: {query}.")
        instruction = (f"Search Query: {query}. \nRank the {num} passages above based on their relevance to the "
                       f"search query. The passages should be listed in descending order using identifiers. The most "
                       f"relevant passages should be listed first. The output format should be [] > [], e.g., "
                       f"[1] > [2]. Only respond with the ranking results, do not say any word or explain.")
    messages = [{"role": "system", "content": NOVELTY_SYSTEM if novelty else SYSTEM},
                {"role": "user", "content": task},
                {"role": "assistant", "content": "Okay, please provide the passages."}]
    for i, text in enumerate(passages, 1):
        messages.append({"role": "user", "content": f"[{i}] {' '.join(text.split()[:words])}"})
        messages.append({"role": "assistant", "content": f"Received passage [{i}]."})
    messages.append({"role": "user", "content": instruction})
    return messages


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """The documented estimate when no tokenizer is available (see the module docstring)."""
    total = 3
    for message in messages:
        text = message["content"]
        total += max(-(-len(text) // 4), -(-len(text.split()) * 4 // 3)) + 4
    return total


def token_counter(source: str, model: str) -> tuple[Callable[[list[dict[str, str]]], int], str]:
    """A function counting a conversation's tokens, and a description of how it counts.

    `source` is a tokenizer folder or hub id ("" tries `model`, "none" forces the estimate). Only local files
    are read: a hub id must already be in the Hugging Face cache. An explicit `source` that cannot be loaded is
    an error; an implicit one falls back to the estimate."""
    if source == "none" or (not source and not _tokenizer_is_local(model)):
        return estimate_tokens, "estimate (max(chars/4, words*4/3) + 4 per message)"
    name = source or model
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for missing or foreign files
        if source:
            raise CrossrankError(f"--tokenizer {source}: cannot load it from local files ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:200]}; expected a tokenizer folder or a cached hub id, "
                                 f"or 'none' for the estimate)") from None
        return estimate_tokens, "estimate (max(chars/4, words*4/3) + 4 per message)"

    def count_template(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def count_contents(messages: list[dict[str, str]]) -> int:
        return 3 + sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 4 for m in messages)

    if getattr(tokenizer, "chat_template", None):
        try:
            count_template(build_messages("query", ["passage", "passage"], 1))
            return count_template, f"{name} (chat template)"
        except Exception:  # templates that refuse a system role or alternate roles strictly (jinja errors)
            pass
    return count_contents, f"{name} (contents + 4 per message)"


def _tokenizer_is_local(model: str) -> bool:
    if Path(model).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "tokenizer_config.json"), str)
    except Exception:  # not a valid repo id, no cache: then there is no local tokenizer
        return False


def fit_messages(query: str, passages: list[str], cfg: TeacherConfig,
                 count: Callable[[list[dict[str, str]]], int]) -> tuple[list[dict[str, str]], int, int]:
    """The largest word budget <= passage_words whose prompt fits `context_size - max_completion_tokens`
    (binary search: the token count grows with the budget). Returns (messages, words, prompt tokens)."""
    limit = cfg.context_size - cfg.max_completion_tokens

    def fits(words: int) -> tuple[bool, list[dict[str, str]], int]:
        messages = build_messages(query, passages, words, cfg.novelty)
        tokens = count(messages)
        return tokens <= limit, messages, tokens

    ok, messages, tokens = fits(cfg.passage_words)
    if ok:
        return messages, cfg.passage_words, tokens
    low, high = 0, cfg.passage_words  # fits(low) (or low == 0), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle)[0]:
            low = middle
        else:
            high = middle
    if low == 0:
        raise CrossrankError(f"a window of {len(passages)} passages does not fit --context-size {cfg.context_size} "
                             f"even at 1 word per passage (needs {fits(1)[2]} tokens + {cfg.max_completion_tokens} "
                             f"for the answer; expected a larger --context-size or a smaller --window)")
    _, messages, tokens = fits(low)
    return messages, low, tokens


def parse_permutation(answer: str, n: int) -> tuple[list[int], list[str]]:
    """An answer like `[2] > [1] > [3]` -> a 0-based order of all `n` passages, and the problems found.

    RankGPT's repair: take the identifiers in order, drop repeats and out-of-range ids, append the missing
    ones in their previous order. Identifiers are the `[i]` in the answer when it has any (so `[3] > [1], 2
    passages are off-topic` does not read `2` as an id), else every number in it; `<think>...</think>`
    reasoning is ignored. Problems: no_ids, duplicates, out_of_range, missing (empty list: well-formed)."""
    text = re.sub(r"<think>.*?(</think>|$)", " ", answer or "", flags=re.DOTALL)
    tokens = re.findall(r"\[\s*(\d+)\s*\]", text) or re.findall(r"\d+", text)
    order: list[int] = []
    problems: set[str] = set()
    for token in tokens:
        index = int(token) - 1
        if not 0 <= index < n:
            problems.add("out_of_range")
        elif index in order:
            problems.add("duplicates")
        else:
            order.append(index)
    if not tokens:
        problems.add("no_ids")
    elif len(order) < n:
        problems.add("missing")
    return order + [i for i in range(n) if i not in order], sorted(problems)
