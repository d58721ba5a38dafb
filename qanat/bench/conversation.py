"""Multi-turn workload: N conversations of T turns, each turn re-sending the whole history with the previous answer
and a new question, as chat clients do. What a prompt cache is for: turn t's prompt starts with turn t-1's prompt
and answer. Reported per turn: TTFT, cached prompt tokens; and the aggregate output tokens/s.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from qanat.bench.loadgen import RequestRecord, stream_request
from qanat.bench.workload import _words


@dataclass(frozen=True)
class ConversationSpec:
    conversations: int = 16
    turns: int = 4
    opening_words: int = 120  # the first user message (a document, a long question): ~150 tokens
    question_words: int = 20  # each later question
    output_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.conversations < 1 or self.turns < 1 or self.output_tokens < 1:
            raise ValueError("--conversations, --turns and --output-tokens must be >= 1")


@dataclass
class TurnRecord(RequestRecord):
    conversation: int = 0
    turn: int = 0  # 1-based
    text: str = ""


def _questions(spec: ConversationSpec) -> list[list[str]]:
    rng = random.Random(spec.seed)
    out = []
    for c in range(spec.conversations):
        first = f"Conversation {c}. Read these notes and keep them in mind: {_words(rng, spec.opening_words)}. " \
                f"What do they say about water?"
        later = [f"Turn {t}: now tell me about {_words(rng, spec.question_words)}?" for t in range(2, spec.turns + 1)]
        out.append([first, *later])
    return out


async def _stream_turn(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
                       ) -> TurnRecord:
    pieces: list[str] = []
    record = TurnRecord()
    await stream_request(client, url, body, headers, into=record, texts=pieces)
    record.text = "".join(pieces)
    return record


async def run_conversations(base_url: str, model: str, spec: ConversationSpec, concurrency: int,
                            headers: dict[str, str] | None = None, timeout_s: float = 600.0,
                            ignore_eos: bool = True, transport: httpx.AsyncBaseTransport | None = None
                            ) -> tuple[list[TurnRecord], float]:
    """Every conversation runs its turns in order; at most `concurrency` requests are in flight."""
    url = f"{base_url.rstrip('/')}/chat/completions"
    gate = asyncio.Semaphore(concurrency)
    records: list[TurnRecord] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as client:
        start = time.perf_counter()

        async def converse(c: int, questions: list[str]) -> None:
            messages: list[dict[str, str]] = []
            for t, question in enumerate(questions, start=1):
                messages.append({"role": "user", "content": question})
                body = {"model": model, "messages": messages, "max_tokens": spec.output_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                if ignore_eos:
                    body["ignore_eos"] = True
                async with gate:
                    sent = time.perf_counter() - start
                    record = await _stream_turn(client, url, body, headers or {})
                record.conversation, record.turn, record.start_s = c, t, sent
                records.append(record)
                if not record.ok:
                    return
                messages = [*messages, {"role": "assistant", "content": record.text}]

        await asyncio.gather(*(converse(c, q) for c, q in enumerate(_questions(spec))))
        return records, time.perf_counter() - start


def summarize_turns(records: list[TurnRecord], wall_s: float) -> dict[str, Any]:
    """Per turn: requests, p50/p90 TTFT, mean prompt and cached tokens; overall: output tokens/s."""
    per_turn = []
    for turn in sorted({r.turn for r in records}):
        ok = [r for r in records if r.turn == turn and r.ok and r.ttft_s is not None]
        ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
        per_turn.append({
            "turn": turn, "completed": len(ok),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else None,
            "prompt_tokens_mean": statistics.mean(r.prompt_tokens or 0 for r in ok) if ok else None,
            "cached_tokens_mean": statistics.mean(r.cached_tokens or 0 for r in ok) if ok else None,
        })
    later = sorted(r.ttft_s for r in records if r.turn >= 2 and r.ok and r.ttft_s is not None)
    return {
        "completed": sum(r.ok for r in records), "failed": sum(not r.ok for r in records), "wall_s": wall_s,
        "output_tokens_per_s": sum(r.output_tokens for r in records if r.ok) / wall_s if wall_s else 0.0,
        "ttft_p50_later_turns_s": statistics.median(later) if later else None,
        "turns": per_turn,
    }


def conversations_markdown(summary: dict[str, Any]) -> str:
    lines = ["| turn | completed | TTFT p50 s | TTFT p90 s | prompt tokens | cached tokens |",
             "|---|---|---|---|---|---|"]
    for t in summary["turns"]:
        def f(v: float | None, fmt: str = ".3f") -> str:
            return "n/a" if v is None else format(v, fmt)
        lines.append(f"| {t['turn']} | {t['completed']} | {f(t['ttft_p50_s'])} | {f(t['ttft_p90_s'])} | "
                     f"{f(t['prompt_tokens_mean'], '.0f')} | {f(t['cached_tokens_mean'], '.0f')} |")
    p50 = summary["ttft_p50_later_turns_s"]
    lines.append(f"\n{summary['completed']} turns ok, {summary['failed']} failed; "
                 f"{summary['output_tokens_per_s']:.1f} output tokens/s; "
                 f"TTFT p50 of turns 2+: {'n/a' if p50 is None else f'{p50:.3f} s'}")
    return "\n".join(lines) + "\n"


def records_json(records: list[TurnRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in sorted(records, key=lambda r: (r.conversation, r.turn))]
