"""What detectors return: spans with a category and a score, and how overlapping spans merge."""

from __future__ import annotations

from dataclasses import dataclass

# The categories Qanat really detects, named in the style of OpenAI's moderation categories.
PII_CATEGORIES = ("pii/phone", "pii/email", "pii/iban", "pii/card", "pii/national_id", "pii/ip", "pii/secret")
CATEGORIES = ("pii", *PII_CATEGORIES, "prompt_injection", "blocked_topic", "language")

# Tags that replace a redacted span, e.g. "call me on [PHONE]".
REDACTION_TAGS = {
    "pii/phone": "[PHONE]", "pii/email": "[EMAIL]", "pii/iban": "[IBAN]", "pii/card": "[CARD]",
    "pii/national_id": "[NATIONAL_ID]", "pii/ip": "[IP]", "pii/secret": "[SECRET]",
    "prompt_injection": "[REMOVED]", "blocked_topic": "[REMOVED]", "language": "[REMOVED]",
}


@dataclass(frozen=True)
class Span:
    category: str  # one of CATEGORIES (never the bare "pii")
    start: int  # [start, end) in the text the detector saw
    end: int
    score: float  # 0..1: how sure the detector is
    rule: str = ""  # which pattern or check found it, for logs and the eval's failure lists

    def shifted(self, start: int, end: int) -> Span:
        return Span(self.category, start, end, self.score, self.rule)


def parent_category(category: str) -> str | None:
    """"pii/phone" -> "pii"; top-level categories have none."""
    head, sep, _ = category.partition("/")
    return head if sep else None


def merge_overlapping(spans: list[Span]) -> list[Span]:
    """Overlapping spans become one: the union of their characters, under the category of the highest score
    (a card number inside an IBAN-looking run is one redaction, not two tags in a row)."""
    ordered = sorted(spans, key=lambda s: (s.start, -s.end))
    merged: list[Span] = []
    for span in ordered:
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            best = last if last.score >= span.score else span
            merged[-1] = Span(best.category, last.start, max(last.end, span.end), max(last.score, span.score),
                              best.rule)
        else:
            merged.append(span)
    return merged
