"""One scan of one text: normalise once, run the detectors a caller needs, and give back spans in the
original string's characters, per-category scores and the language."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from qanat.guard import injection, pii
from qanat.guard.concepts import find_concept_pairs
from qanat.guard.language import LanguageInfo, identify
from qanat.guard.normalize import Normalized, normalize
from qanat.guard.spans import CATEGORIES, PII_CATEGORIES, Span, merge_overlapping, parent_category
from qanat.guard.topics import TopicMatcher

_HAS_ARABIC = re.compile(r"[\u0600-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufeff]")
_HAS_LATIN = re.compile(r"[a-z]")
_HAS_DIGIT = re.compile(r"\d")
# A language outside the allow-list counts only when the identifier is this sure: short texts full of numbers
# and Arabizi get low-confidence guesses (Catalan, Turkish, Uzbek) that must not block anyone.
LANGUAGE_MIN_SCORE = 0.5
_MACROLANGUAGE = {"ary": "ar", "arz": "ar", "zgh": "ber", "kab": "ber", "tzm": "ber", "shi": "ber"}


@dataclass(frozen=True)
class ScanSettings:
    phone_regions: tuple[str, ...] = ("MA", "FR")  # where national-format numbers (0...) are checked
    injection_threshold: float = injection.DEFAULT_THRESHOLD
    languages: tuple[str, ...] = ()  # the allow-list; empty: every language is allowed
    topics: Mapping[str, Sequence[str]] = field(default_factory=dict)  # blocked topic -> phrases


@dataclass(frozen=True)
class ScanResult:
    text: str
    spans: list[Span]  # in `text`'s characters, sorted; PII spans merged across PII categories
    scores: dict[str, float]  # category -> 0..1, every category of CATEGORIES ("pii": its best sub-category)
    language: LanguageInfo | None
    threshold: float

    def flagged(self, category: str) -> bool:
        return self.scores.get(category, 0.0) >= (self.threshold if category == "prompt_injection" else 0.5)

    @property
    def categories(self) -> dict[str, bool]:
        return {c: self.flagged(c) for c in CATEGORIES}


class Scanner:
    def __init__(self, settings: ScanSettings | None = None) -> None:
        self.settings = settings or ScanSettings()
        self.topics = TopicMatcher(self.settings.topics)
        self.allowed = frozenset(self.settings.languages)

    def scan(self, text: str, categories: Collection[str] | None = None, context: str = "") -> ScanResult:
        """Every detector, or only those for `categories` (the parent "pii" selects all PII detectors).
        `context` (text just before, already scanned) is read for context words only."""
        wanted = set(CATEGORIES if categories is None else categories)
        if "pii" in wanted:
            wanted.update(PII_CATEGORIES)
        norm = normalize(text)
        spans = self._pii(norm, wanted, normalize(context).text if context else "")
        injection_spans: list[Span] = []
        if "prompt_injection" in wanted:
            injection_spans = self._injection(norm)
        topic_spans = [_to_original(norm, s) for s in self.topics.find(norm.text)] if "blocked_topic" in wanted \
            else []
        language = identify(norm) if "language" in wanted else None
        scores = dict.fromkeys(CATEGORIES, 0.0)
        merged = merge_overlapping(spans)
        for span in spans:
            scores[span.category] = max(scores[span.category], span.score)
        scores["pii"] = max((scores[c] for c in PII_CATEGORIES), default=0.0)
        scores["prompt_injection"] = injection.combined_score(injection_spans)
        scores["blocked_topic"] = 1.0 if topic_spans else 0.0
        all_spans = merged + injection_spans + topic_spans
        if language is not None and self.allowed and language.score >= LANGUAGE_MIN_SCORE \
                and not self._allowed(language.language):
            scores["language"] = language.score
            all_spans.append(Span("language", 0, len(text), scores["language"], language.language))
        all_spans.sort(key=lambda s: (s.start, s.end))
        return ScanResult(text, all_spans, scores, language, self.settings.injection_threshold)

    def _allowed(self, language: str) -> bool:
        return language == "und" or language in self.allowed or _MACROLANGUAGE.get(language) in self.allowed

    def _pii(self, norm: Normalized, wanted: set[str], context: str) -> list[Span]:
        text = norm.text
        found: list[Span] = []
        if _HAS_DIGIT.search(text) is not None:
            if "pii/phone" in wanted:
                found += pii.find_phones(norm, self.settings.phone_regions)
            if "pii/iban" in wanted:
                found += pii.find_ibans(norm)
            if "pii/card" in wanted:
                found += pii.find_cards(norm)
            if "pii/national_id" in wanted:
                found += pii.find_national_ids(norm, context)
            if "pii/ip" in wanted:
                found += pii.find_ips(norm)
        if "pii/email" in wanted and "@" in text:
            found += pii.find_emails(norm)
        spans = [_to_original(norm, s) for s in found]
        if "pii/secret" in wanted:
            spans += pii.find_secrets(norm.original)
        return spans

    def _injection(self, norm: Normalized) -> list[Span]:
        has_arabic = not norm.original.isascii() and _HAS_ARABIC.search(norm.text) is not None
        has_latin = _HAS_LATIN.search(norm.text) is not None
        found = injection.find_injection_patterns(norm, has_arabic, has_latin) + find_concept_pairs(norm.text)
        spans = [_to_original(norm, s) for s in found]
        return spans + injection.find_encoded_payloads(norm.original) + \
            injection.find_invisible_smuggling(norm.original)


def _to_original(norm: Normalized, span: Span) -> Span:
    return span.shifted(*norm.to_original(span.start, span.end))


def is_pii(category: str) -> bool:
    return parent_category(category) == "pii"
