#!/usr/bin/env python
"""Teacher rankings: re-rank a run's top-k with an LLM (RankGPT sliding windows) over any OpenAI-compatible
chat endpoint (OpenAI, vLLM, ...). The API key is read from $OPENAI_API_KEY (or --api-key-env NAME).

    python rank_gpt.py --dataset msmarco-train --run colbert --k 20 --window 20 \\
        --model gpt-3.5-turbo -o runs/msmarco-train.rankgpt.run

A killed run resumes where it stopped when started again with the same arguments. See the README,
"Teacher rankings (rank_gpt.py)", and `crossrank/teacher/run.py` (the run), `rankgpt.py`
(prompts, parsing), `chat.py` (the client), `cli.py` (the flags).
"""
import sys

from crossrank import cli
from crossrank.teacher.__main__ import main

if __name__ == "__main__":
    sys.exit(cli.run_main(main))
