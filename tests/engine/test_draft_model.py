"""The draft model's KV follows the target's sequences (real model, no target: the tests play the executor's part).

Each check compares what a sequence drafts after a history of steps (catch-up, rejections, trims, copies) with
what a spare sequence drafts when fed the same tokens afresh: a draft KV out of step with its sequence's tokens
(a rejected draft's cells left behind, a copy or trim not followed) drafts something else, or nothing (llama.cpp
refuses a batch whose positions do not follow the sequence's cells)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qanat.engine.executors.base import CacheOp, ExecChunk

pytestmark = pytest.mark.model

SPARE = 3  # the reference sequence


@pytest.fixture(scope="module")
def drafter() -> Iterator[tuple[object, list[int]]]:
    from qanat.engine.executors.draft_model import DraftModel
    from qanat.engine.executors.llamacpp import ContextSettings, LlamaModel
    from qanat.models.locate import default_model_path

    path = default_model_path()
    target = LlamaModel(path, vocab_only=True)
    prompt = target.tokenize("The capital of France is Paris. The capital of Italy is Rome. The capital of", True)
    model = DraftModel(path, path, target, ContextSettings(num_slots=4, context_length=256, batch_tokens=64,
                                                           threads=2))
    yield model, prompt
    model.close()
    target.close()


def chunk(seq_id: int, start: int, tokens: list[int], draft_len: int = 0, request_id: str = "r") -> ExecChunk:
    return ExecChunk(request_id, seq_id, start, tokens, True, (), draft_len)


def step(model: object, c: ExecChunk, accepted: int | None = None) -> tuple[int, ...]:
    """One executor step for one chunk: observe, draft; then settle as if `accepted` drafts were kept."""
    from qanat.engine.executors.draft_model import DraftModel

    assert isinstance(model, DraftModel)
    model.observe([c])
    drafts = model.draft([c]) if c.draft_len else {}
    if c.request_id in drafts:
        model.settle(c, len(drafts[c.request_id]) if accepted is None else accepted)
    return drafts.get(c.request_id, ())


def fresh(model: object, tokens: list[int], n: int) -> tuple[int, ...]:
    """What the spare sequence drafts when fed `tokens` in one go."""
    from qanat.engine.executors.draft_model import DraftModel

    assert isinstance(model, DraftModel)
    model.apply([CacheOp(SPARE, keep=0)], set(), lambda key: None)
    return step(model, chunk(SPARE, 0, tokens, n, "reference"), accepted=0)


def test_drafts_after_catch_up_rejections_and_full_acceptance_equal_fresh_ones(
        drafter: tuple[object, list[int]]) -> None:
    model, prompt = drafter
    first = step(model, chunk(0, 0, prompt, 4), accepted=1)  # the target kept 1 draft, then picked another token
    assert len(first) == 4 and first == fresh(model, prompt, 4)
    other = next(t for t in (13, 28, 30) if t != first[1])
    tokens = [*prompt, first[0], other]
    second = step(model, chunk(0, len(tokens) - 1, [other], 4), accepted=4)  # all kept, then a bonus token
    assert len(second) == 4 and second == fresh(model, tokens, 4)
    tokens += [*second, 11]
    third = step(model, chunk(0, len(tokens) - 1, [11], 3), accepted=0)
    assert len(third) == 3 and third == fresh(model, tokens, 3)


def test_trims_and_copies_of_the_targets_sequences_are_followed(drafter: tuple[object, list[int]]) -> None:
    from qanat.engine.executors.draft_model import DraftModel

    model, prompt = drafter
    assert isinstance(model, DraftModel)
    model.apply([CacheOp(1, keep=0)], set(), lambda key: None)
    step(model, chunk(1, 0, prompt, 4), accepted=2)
    # A new request copies 12 tokens of sequence 1 into sequence 2, and another keeps 10 of them in place.
    model.apply([CacheOp(2, keep=12, copy_from=1), CacheOp(1, keep=10)], set(), lambda key: None)
    # (Each continues with the prompt's own next tokens: what it drafts then depends on the prefix.)
    in_place = step(model, chunk(1, 10, prompt[10:13], 4, "a"), accepted=0)
    copied = step(model, chunk(2, 12, prompt[12:15], 3, "b"), accepted=0)
    assert in_place == fresh(model, prompt[:13], 4)
    assert copied == fresh(model, prompt[:15], 3)
    # Restored from a tier: the entry's tokens stand for the sequence's.
    entry = tuple(prompt[:9])
    model.apply([CacheOp(1, keep=9, restore_key="k")], set(), lambda key: entry if key == "k" else None)
    restored = step(model, chunk(1, 9, prompt[9:14], 3, "c"), accepted=0)
    assert restored == fresh(model, prompt[:14], 3)
    # An entry no tier holds any more: the sequence's tokens are unknown, so it drafts nothing until emptied.
    model.apply([CacheOp(1, keep=9, restore_key="gone")], set(), lambda key: None)
    assert step(model, chunk(1, 9, prompt[9:14], 3, "d")) == ()


def test_sequences_drafting_together_draft_what_each_drafts_alone(drafter: tuple[object, list[int]]) -> None:
    from qanat.engine.executors.draft_model import DraftModel

    model, prompt = drafter
    assert isinstance(model, DraftModel)
    model.apply([CacheOp(0, keep=0), CacheOp(1, keep=0)], set(), lambda key: None)
    chunks = [chunk(0, 0, prompt, 3, "x"), chunk(1, 0, prompt[:15], 5, "y")]
    model.observe(chunks)
    drafts = model.draft(chunks)
    for c in chunks:
        model.settle(c, 0)
    assert drafts == {"x": fresh(model, prompt, 3), "y": fresh(model, prompt[:15], 5)}
