"""Text normalisation for the detectors, with a map back to the original characters.

Every detector matches the folded text, so one pattern covers "Ignore", "ＩＧＮＯＲＥ", "ignoré", "إِلْغَاء" and
"الغاء"; redaction must still cut the characters the user sent, so `Normalized.offsets[i]` is the index in the
original string of the character that produced folded character i.

Folding, per character (cached: a text is mostly characters seen before):
- NFKC, then case folding, then Latin accents stripped (é -> e; NFKD's combining marks dropped);
- Arabic: harakat, Quranic marks and tatweel removed; alef forms -> ا, alef maksura and Persian yeh -> ي,
  teh marbuta -> ه, Persian kaf -> ك;
- Arabic-Indic and Persian digits -> ASCII digits (NFKC leaves them alone);
- invisible and bidi control characters (format characters, Unicode category Cf) removed;
- every kind of space -> " ".
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_ARABIC_FOLD = {
    "أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ٲ": "ا", "ٳ": "ا",
    "ى": "ي", "ی": "ي", "ې": "ي", "ئ": "ي",
    "ة": "ه", "ۀ": "ه", "ہ": "ه", "ک": "ك", "ڭ": "ك", "ؤ": "و", "ڤ": "ف", "گ": "ك",
}
# Latin look-alikes from Cyrillic and Greek, folded so "іgnore" (Cyrillic і) still reads "ignore".
_HOMOGLYPHS = {"а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "х": "x", "у": "y", "і": "i", "ј": "j",
               "ѕ": "s", "ο": "o", "α": "a", "ν": "v", "ι": "i", "κ": "k", "ρ": "p", "τ": "t",
               "’": "'", "‘": "'", "ʼ": "'", "´": "'", "`": "'", "«": '"', "»": '"', "“": '"', "”": '"'}

# Format characters that text carries legitimately and that must not be read as smuggling: LRM/RLM (Arabic
# text copied from word processors) and ZWNJ/ZWJ (Persian words, emoji sequences). They are still removed.
BENIGN_FORMAT_CHARS = frozenset("\u200c\u200d\u200e\u200f\u061c")


def _is_arabic_mark(ch: str) -> bool:
    cp = ord(ch)
    return 0x064B <= cp <= 0x065F or cp == 0x0670 or 0x06D6 <= cp <= 0x06ED or 0x0610 <= cp <= 0x061A or cp == 0x0640


def _fold_char(ch: str) -> str:
    if unicodedata.category(ch) == "Cf" or _is_arabic_mark(ch):
        return ""
    cp = ord(ch)
    if 0x0660 <= cp <= 0x0669:
        return chr(cp - 0x0660 + 48)
    if 0x06F0 <= cp <= 0x06F9:
        return chr(cp - 0x06F0 + 48)
    if ch in _ARABIC_FOLD:
        return _ARABIC_FOLD[ch]
    if ch in _HOMOGLYPHS:
        return _HOMOGLYPHS[ch]
    if ch.isspace():
        return " "
    out = []
    for c in unicodedata.normalize("NFKC", ch).casefold():
        if c in _ARABIC_FOLD:
            out.append(_ARABIC_FOLD[c])
            continue
        if c.isspace():
            out.append(" ")
            continue
        # Strip Latin (and other non-Arabic) combining accents; Arabic marks are handled above.
        out.extend(d for d in unicodedata.normalize("NFKD", c) if not unicodedata.combining(d)
                   or _is_arabic_mark(d))
    return "".join(d for d in out if not _is_arabic_mark(d))


_CACHE: dict[str, str] = {}
_IRREGULAR: set[str] = set()  # characters that fold to nothing or to several characters


def fold_char(ch: str) -> str:
    folded = _CACHE.get(ch)
    if folded is None:
        folded = _CACHE[ch] = _fold_char(ch)
        _TABLE[ord(ch)] = folded
        if len(folded) != 1:
            _IRREGULAR.add(ch)
    return folded


class _FoldTable(dict[int, str]):
    """str.translate's table, filled on first sight of each character."""

    def __missing__(self, codepoint: int) -> str:
        return fold_char(chr(codepoint))


_TABLE = _FoldTable()


@dataclass(frozen=True)
class Normalized:
    """The folded text and, for each of its characters, the original index it came from."""

    original: str
    text: str
    offsets: tuple[int, ...] | None  # None: the identity (ASCII text only changes case)

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """A folded span [start, end) as the original characters that produced it."""
        if self.offsets is None:
            return start, end
        if start >= len(self.offsets):
            return len(self.original), len(self.original)
        first = self.offsets[start]
        last = self.offsets[end - 1] + 1 if end > start else first
        # A folded character may come from a run of original ones (an accent dropped after it): take them all.
        while last < len(self.original) and fold_char(self.original[last]) == "":
            last += 1
        return first, last


def normalize(text: str) -> Normalized:
    if text.isascii():
        # Only case changes, and control characters stay: the identity map holds.
        return Normalized(text, text.lower(), None)
    folded_text = text.translate(_TABLE)  # in C, once every character has been seen
    if _IRREGULAR.isdisjoint(text):
        return Normalized(text, folded_text, None)  # one character each: the identity map holds
    # Runs of one-to-one characters map by ranges; only the irregular ones are visited in Python.
    offsets: list[int] = []
    last = 0
    for m in _irregular_pattern().finditer(text):
        i = m.start()
        offsets.extend(range(last, i))
        offsets.extend([i] * len(_CACHE[text[i]]))
        last = i + 1
    offsets.extend(range(last, len(text)))
    return Normalized(text, folded_text, tuple(offsets))


_IRREGULAR_RE: tuple[int, re.Pattern[str]] = (0, re.compile(r"(?!)"))


def _irregular_pattern() -> re.Pattern[str]:
    global _IRREGULAR_RE
    if _IRREGULAR_RE[0] != len(_IRREGULAR):  # the set only grows: its size says whether the regex is current
        chars = sorted(_IRREGULAR)
        _IRREGULAR_RE = (len(chars), re.compile("[" + "".join(re.escape(c) for c in chars) + "]"))
    return _IRREGULAR_RE[1]


def fold_pattern(pattern: str) -> str:
    """A regex written in natural script, folded like text (Arabic letters, accents) but never case-folded,
    so escapes such as \\S and \\W keep their meaning."""
    out = []
    for ch in pattern:
        if ch.isascii():
            out.append(ch)
        else:
            out.append(fold_char(ch))
    return "".join(out)
