"""Benchmark workloads: synthetic prompts of controlled length, an optional shared prefix, or the multilingual set.

Lengths are exact when a tokenizer for the target's model is at hand (the prompt text is checked by
re-tokenizing it), and an estimate (about 4 characters per token), clearly marked, otherwise.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from importlib import resources
from typing import Protocol

CHARS_PER_TOKEN_ESTIMATE = 4.0

_WORDS = (
    "water", "channel", "oasis", "tunnel", "shaft", "slope", "farmer", "garden", "palm", "barley", "mint",
    "season", "spring", "drought", "well", "stone", "clay", "village", "council", "share", "hour", "flow",
    "river", "mountain", "desert", "sand", "wind", "sun", "shade", "night", "morning", "market", "road",
    "cooperative", "engineer", "surveyor", "record", "harvest", "field", "orchard", "olive", "almond",
    "fig", "date", "cistern", "basin", "gate",
)


class Tokenizer(Protocol):
    def tokenize(self, text: str, add_special: bool) -> list[int]: ...
    def detokenize(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    input_tokens: int = 200
    output_tokens: int = 128
    shared_prefix_tokens: int = 0
    dataset: str = "synthetic"  # or "multilingual"
    seed: int = 0
    # Spread of output lengths around output_tokens (0.5: uniform in [0.5x, 1.5x]). With one fixed length a closed
    # loop synchronises into waves (every request ends on the same step, the next ones arrive together).
    output_jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.dataset not in ("synthetic", "multilingual"):
            raise ValueError(f"--dataset must be 'synthetic' or 'multilingual', got {self.dataset!r}")
        if self.num_requests < 1 or self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("--num-requests, --input-tokens and --output-tokens must be >= 1")
        if not 0 <= self.output_jitter < 1:
            raise ValueError(f"--output-jitter must be in [0, 1), got {self.output_jitter}")
        if not 0 <= self.shared_prefix_tokens < self.input_tokens:
            raise ValueError(
                f"--shared-prefix ({self.shared_prefix_tokens}) must be below --input-tokens ({self.input_tokens})"
            )


@dataclass(frozen=True)
class Prompt:
    text: str
    input_tokens: int  # exact when `exact`, else estimated from its length in characters
    exact: bool
    language: str | None = None
    output_tokens: int | None = None  # this request's max_tokens when the workload jitters output lengths


def multilingual_prompts() -> list[tuple[str, str]]:
    """(language tag, prompt): English, French, Arabic, Darija (Arabic and Latin script), Tamazight."""
    text = resources.files("qanat.bench").joinpath("data/multilingual.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(row["language"], row["prompt"]) for row in rows]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _fit(text: str, n_tokens: int, tokenizer: Tokenizer) -> tuple[str, int]:
    """Cut `text` to `n_tokens` tokens; re-tokenizing the cut text may merge differently, so check and trim."""
    ids = tokenizer.tokenize(text, add_special=False)[:n_tokens]
    while ids:
        candidate = tokenizer.detokenize(ids)
        count = len(tokenizer.tokenize(candidate, add_special=False))
        if count <= n_tokens:
            return candidate, count
        ids = ids[: -(count - n_tokens)]
    return "", 0


def build_prompts(spec: WorkloadSpec, tokenizer: Tokenizer | None) -> list[Prompt]:
    prompts = _build_prompts(spec, tokenizer)
    if not spec.output_jitter:
        return prompts
    rng = random.Random(spec.seed + 7919)  # its own stream: prompt texts stay those of the unjittered workload
    lo, hi = spec.output_tokens * (1 - spec.output_jitter), spec.output_tokens * (1 + spec.output_jitter)
    return [replace(p, output_tokens=max(1, round(rng.uniform(lo, hi)))) for p in prompts]


def _build_prompts(spec: WorkloadSpec, tokenizer: Tokenizer | None) -> list[Prompt]:
    rng = random.Random(spec.seed)
    if spec.dataset == "multilingual":
        rows = multilingual_prompts()
        chosen = [rows[i % len(rows)] for i in range(spec.num_requests)]
        return [
            Prompt(text, len(tokenizer.tokenize(text, False)) if tokenizer else _estimate(text), tokenizer is not None,
                   language)
            for language, text in chosen
        ]

    words_needed = spec.input_tokens * 2  # comfortably more than needed, then cut to length
    prefix = _words(random.Random(spec.seed - 1), words_needed) if spec.shared_prefix_tokens else ""
    prompts = []
    for i in range(spec.num_requests):
        body = f"Request {i}: " + _words(rng, words_needed)
        if tokenizer is None:
            prefix_chars = int(spec.shared_prefix_tokens * CHARS_PER_TOKEN_ESTIMATE)
            body_chars = int((spec.input_tokens - spec.shared_prefix_tokens) * CHARS_PER_TOKEN_ESTIMATE)
            text = prefix[:prefix_chars] + body[:body_chars]
            prompts.append(Prompt(text, _estimate(text), exact=False))
            continue
        head, n_head = _fit(prefix, spec.shared_prefix_tokens, tokenizer) if prefix else ("", 0)
        tail, _ = _fit(" " + body if head else body, spec.input_tokens - n_head, tokenizer)
        text = head + tail
        prompts.append(Prompt(text, len(tokenizer.tokenize(text, add_special=False)), exact=True))
    return prompts


def _estimate(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN_ESTIMATE))
