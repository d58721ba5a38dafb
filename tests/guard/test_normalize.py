"""Folding and the map back to the original characters: redaction must cut what the user sent."""

from __future__ import annotations

import pytest

from qanat.guard.normalize import fold_pattern, normalize


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("ＩＧＮＯＲＥ", "ignore"),  # full-width (NFKC) and case
        ("Ignoré précédentes", "ignore precedentes"),  # accents
        ("تَجَاهَلْ التعليمـــات", "تجاهل التعليمات"),  # harakat and tatweel
        ("أإآٱ ى ة", "اااا ي ه"),  # alef, yeh, teh marbuta
        ("٠٦١٢ ۰۶۱۲", "0612 0612"),  # Arabic-Indic and Persian digits
        ("ig\u200bno\u200dre\u202e", "ignore"),  # zero-width and bidi controls removed
        ("іgnore", "ignore"),  # Cyrillic і
        ("l’instruction", "l'instruction"),
        ("ﬁn", "fin"),  # a ligature becomes two characters
    ],
)
def test_folding(text: str, folded: str) -> None:
    assert normalize(text).text == folded


def test_offsets_lead_back_to_the_original_characters() -> None:
    text = "رقمي ٠٦١٢٣٤٥٦٧٨ يا\u200b صديقي"
    norm = normalize(text)
    start = norm.text.index("0612345678")
    a, b = norm.to_original(start, start + 10)
    assert text[a:b] == "٠٦١٢٣٤٥٦٧٨"
    # A dropped character inside a span stays inside it; one after it is taken along with the last letter.
    norm = normalize("ab\u200bcd")
    assert norm.text == "abcd" and norm.to_original(1, 3) == (1, 4)
    norm = normalize("ﬁx é")
    assert norm.to_original(0, 2) == (0, 1)  # "fi" came from one character


def test_ascii_text_keeps_the_identity_map() -> None:
    norm = normalize("Call ME")
    assert norm.offsets is None and norm.text == "call me" and norm.to_original(5, 7) == (5, 7)


def test_patterns_fold_letters_but_keep_regex_escapes() -> None:
    assert fold_pattern(r"\W+تجاهلْ\S") == r"\W+تجاهل\S"
