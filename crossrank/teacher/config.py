"""Settings of a teacher run (`rank_gpt.py`): what to rank, the prompt budget, the endpoint and its retries.

`RESUME_KEYS` are the settings that change the ranking: a resumed run must use the same ones.
"""
from __future__ import annotations

import dataclasses

from crossrank.errors import CrossrankError

# settings that change the ranking: a resumed run must use the same ones
RESUME_KEYS = ("run", "topics", "corpus", "k", "window", "step", "model", "novelty", "passage_words",
               "context_size", "max_completion_tokens")


@dataclasses.dataclass
class TeacherConfig:
    run: str
    topics: str
    corpus: str
    output: str
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = ""  # "": $OPENAI_API_KEY, sent to api.openai.com (https) only; see api_key_for
    k: int = 100
    window: int = 20
    step: int = 10
    novelty: bool = False
    passage_words: int = 300  # RankGPT's starting budget; shrinks until the prompt fits
    context_size: int = 4096  # gpt-3.5-turbo's (RankGPT's teacher) context
    max_completion_tokens: int = 0  # 0: 6 tokens per passage + 32 (an answer `[12] > ` is ~5 tokens per id)
    tokenizer: str = ""  # local tokenizer folder or cached hub id; "" tries --model; "none" estimates
    concurrency: int = 1
    timeout: float = 120.0  # seconds: a deadline for the whole request (connect, send, answer)
    max_response_bytes: int = 4 * 2**20  # an answer larger than this is refused while it is read
    retries: int = 8
    backoff: float = 1.0  # first retry waits ~backoff seconds, then doubling, capped at max_backoff
    max_backoff: float = 60.0
    limit: int = 0  # rank only the first N queries (qid order), e.g. to estimate cost
    tag: str = "rankgpt"
    log_prompts: bool = True
    price_prompt: float = 0.0  # per million prompt tokens, for the summary's cost estimate
    price_completion: float = 0.0
    overwrite: bool = False
    dry_run: bool = False  # count requests and prompt tokens, send nothing, write nothing
    progress: bool = True

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The estimate at `price_prompt` / `price_completion` (per million tokens), rounded to 6 decimals."""
        return round((prompt_tokens * self.price_prompt + completion_tokens * self.price_completion) / 1e6, 6)

    def validate(self) -> "TeacherConfig":
        checks = [(self.k >= 1, "--k", "a positive integer", self.k),
                  (self.window >= 2, "--window", "at least 2", self.window),
                  (1 <= self.step <= self.window, "--step", f"between 1 and --window ({self.window})", self.step),
                  (self.passage_words >= 1, "--passage-words", "a positive integer", self.passage_words),
                  (self.concurrency >= 1, "--concurrency", "a positive integer", self.concurrency),
                  (self.timeout > 0, "--timeout", "a positive number of seconds", self.timeout),
                  (self.max_response_bytes >= 1024, "--max-response-bytes", "at least 1024",
                   self.max_response_bytes),
                  (self.retries >= 0, "--retries", "0 or more", self.retries),
                  (self.limit >= 0, "--limit", "0 (all) or more", self.limit)]
        for ok, flag, expected, got in checks:
            if not ok:
                raise CrossrankError(f"{flag} is invalid (expected {expected}, got {got!r})")
        if self.max_completion_tokens <= 0:
            self.max_completion_tokens = 6 * min(self.window, self.k) + 32
        return self
