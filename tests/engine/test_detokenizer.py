"""Incremental detokenization: UTF-8 safety and stop strings, over a hand-made vocabulary."""

from __future__ import annotations

from qanat.engine.core.detokenizer import IncrementalDetokenizer

MEEM = "م".encode()  # two bytes
VOCAB = {1: b"Hel", 2: b"lo w", 3: b"orld", 4: MEEM[:1], 5: MEEM[1:], 6: "ⵣ".encode()[:2], 7: "ⵣ".encode()[2:]}


def feed(stop: tuple[str, ...], tokens: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(VOCAB.__getitem__, stop)
    pieces = [detok.add(t) for t in tokens]
    return pieces, "".join(pieces) + detok.flush()


def test_multibyte_characters_are_never_split() -> None:
    pieces, text = feed((), [4, 5, 6, 7])
    assert pieces == ["", "م", "", "ⵣ"]
    assert text == "مⵣ"


def test_stop_string_across_tokens_is_cut_and_never_emitted() -> None:
    pieces, text = feed(("lo wo",), [1, 2, 3])
    assert text == "Hel"
    assert "lo" not in "".join(pieces)


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    detok = IncrementalDetokenizer(VOCAB.__getitem__, ("lo x",))
    pieces = [detok.add(1), detok.add(2), detok.add(3)]
    assert pieces == ["He", "llo w", "orld"]  # "l" could begin "lo x"; "lo w" did not, so it is released
    assert "".join(pieces) + detok.flush() == "Hello world"


def test_tail_that_may_start_a_stop_is_flushed_at_the_end() -> None:
    detok = IncrementalDetokenizer(VOCAB.__getitem__, ("world!",))
    assert detok.add(1) + detok.add(2) == "Hello "  # "w" might begin "world!"
    assert detok.add(3) == ""
    assert detok.flush() == "world"


def test_character_cut_off_at_the_end_is_dropped() -> None:
    pieces, text = feed((), [1, 4])
    assert text == "Hel"
