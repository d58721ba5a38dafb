"""The rails: a policy applied to texts going in (whole prompts) and coming out (a stream, piece by piece).

The input rail sees each text whole: block (the request never reaches the engine), redact (the engine sees
tags such as [PHONE] instead), or log. The output rail sees a stream: it sends text as soon as no match could
still grow into it, so a phone number split across tokens is still caught whole and nothing is ever sent and
then retracted; a block ends the stream where the offending text would have begun.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from qanat.guard.policy import Action, Direction, GuardrailsPolicy
from qanat.guard.scan import Scanner, ScanResult
from qanat.guard.spans import REDACTION_TAGS, Span, merge_overlapping

log = logging.getLogger("qanat.guard")


class ContentFilterError(Exception):
    """A request (or an output) that the policy blocks."""

    def __init__(self, category: str, direction: Direction, param: str | None = None) -> None:
        super().__init__(f"the {direction} was blocked by the guardrails: {category}")
        self.category = category
        self.direction = direction
        self.param = param


class GuardRecorder(Protocol):
    """Where the rails report what they did (Prometheus in the server)."""

    def guardrail_action(self, direction: str, category: str, action: str) -> None: ...

    def guardrail_seconds(self, direction: str, seconds: float) -> None: ...


class _NoRecorder:
    def guardrail_action(self, direction: str, category: str, action: str) -> None:
        pass

    def guardrail_seconds(self, direction: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class Decision:
    """What the policy makes of one scan."""

    text: str  # the text with redactions applied
    blocked: str | None  # the category that blocks it, if any
    blocked_at: int | None  # where (original characters) the first blocking span starts
    actions: list[tuple[str, Action]] = field(default_factory=list)  # (category, action) taken


class Guard:
    def __init__(self, policy: GuardrailsPolicy, recorder: GuardRecorder | None = None) -> None:
        self.policy = policy
        self.scanner = Scanner(policy.scan_settings())
        self.recorder: GuardRecorder = recorder or _NoRecorder()
        self.input_categories = policy.active_categories("input")
        self.output_categories = policy.active_categories("output") - {"language"}  # a stream has no whole text
        # Output categories whose matches change the text; with none, the stream passes through untouched.
        self.output_acts = any(policy.action("output", c) in ("block", "redact") for c in self.output_categories)

    def decide(self, result: ScanResult, direction: Direction) -> Decision:
        actions: list[tuple[str, Action]] = []
        redactions: list[Span] = []
        blocked: str | None = None
        blocked_at: int | None = None
        for span in result.spans:
            if not result.flagged(span.category):
                continue
            action = self.policy.action(direction, span.category)
            if action == "off":
                continue
            actions.append((span.category, action))
            if action == "block" and (blocked_at is None or span.start < blocked_at):
                blocked, blocked_at = span.category, span.start
            elif action == "redact":
                redactions.append(span)
        return Decision(redact(result.text, redactions), blocked, blocked_at, _dedupe(actions))

    def check_input(self, text: str, param: str | None = None) -> str:
        """The text the engine may see (redacted), or ContentFilterError."""
        if not self.input_categories:
            return text
        start = time.perf_counter()
        decision = self.decide(self.scanner.scan(text, self.input_categories), "input")
        self.recorder.guardrail_seconds("input", time.perf_counter() - start)
        self._record("input", decision)
        if decision.blocked is not None:
            raise ContentFilterError(decision.blocked, "input", param)
        return decision.text

    def output_rail(self) -> OutputRail:
        return OutputRail(self)

    def _record(self, direction: Direction, decision: Decision) -> None:
        for category, action in decision.actions:
            self.recorder.guardrail_action(direction, category, action)
            if action == "log":
                log.info("guardrails: %s %s (logged)", direction, category)


def _dedupe(actions: list[tuple[str, Action]]) -> list[tuple[str, Action]]:
    return list(dict.fromkeys(actions))


def redact(text: str, spans: list[Span]) -> str:
    if not spans:
        return text
    out, last = [], 0
    for span in merge_overlapping(spans):
        out.append(text[last:span.start])
        out.append(REDACTION_TAGS.get(span.category, "[REDACTED]"))
        last = span.end
    out.append(text[last:])
    return "".join(out)


# -- streaming -------------------------------------------------------------------------------------------

# The tail of a stream that a match could still grow from: the last word (an e-mail, a key, a number still
# being written), and before it the words a number's groups are made of ("06 12 34", "MA64 0111", "AB 12345").
_LAST_WORD = re.compile(r"\S*$")
_JOINABLE = r"(?:\S*\d\S*|[^\W\d_]{1,2}|[+(]\S*)"  # a word that can be a group of a number
_JOINS = re.compile(_JOINABLE)
_GROUP_WORD = re.compile(r"(?<!\S)" + _JOINABLE + r"[ \-]$")
_MAX_HOLD_CHARS = 256  # no detector's match is longer, bar a private key, held apart below
_CONTEXT_CHARS = 80  # sent text kept for context words ("CIN: ..." before the number)


def hold_start(buffer: str) -> int:
    """Where the part of `buffer` that must wait for more text begins."""
    start = _LAST_WORD.search(buffer)
    hold = start.start() if start is not None else len(buffer)
    # Step back over digit groups ("06 12 34 " + "56") while the held part starts with such a group (or with
    # nothing yet) and the word before it is one too.
    word = buffer[hold:]
    while hold > 0 and (not word or _JOINS.fullmatch(word)):
        m = _GROUP_WORD.search(buffer, max(0, hold - 64), hold)
        if m is None or m.end() != hold:
            break
        hold = m.start()
        word = buffer[hold:m.end() - 1]
    hold = max(hold, len(buffer) - _MAX_HOLD_CHARS)
    key = buffer.rfind("-----BEGIN")
    if key >= 0 and buffer.find("-----END", key) < 0:
        hold = min(hold, key)  # a private key: held until it ends, then redacted whole
    return hold


class OutputRail:
    """One choice's stream through the output policy: `feed` each piece, `finish` at the end."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.pending = ""  # received, not yet sent
        self.context = ""  # the end of what was sent, for context words
        self.blocked: str | None = None

    def feed(self, piece: str) -> str:
        """The text that can be sent now. After a block, `blocked` names the category and nothing more is sent."""
        if self.blocked is not None or not self.guard.output_acts:
            return "" if self.blocked is not None else piece
        self.pending += piece
        return self._release(hold_start(self.pending))

    def finish(self) -> str:
        if self.blocked is not None or not self.guard.output_acts:
            return ""
        return self._release(len(self.pending))

    def _release(self, hold: int) -> str:
        if hold <= 0 and self.pending:
            return ""
        start = time.perf_counter()
        # The end of what was sent goes in front: context words ("CIN:") and phrases that began there
        # ("pipe " sent, "bomb" now) count. Spans wholly inside it were dealt with when it was released.
        offset = len(self.context)
        result = self.guard.scanner.scan(self.context + self.pending, self.guard.output_categories)
        spans = [s.shifted(max(s.start, offset) - offset, s.end - offset) for s in result.spans if s.end > offset]
        cut = hold
        for span in spans:  # a match that reaches into the held part is not finished: keep it whole
            if span.start < hold < span.end:
                cut = min(cut, span.start)
        for span in spans:
            if self.guard.policy.action("output", span.category) == "block" and result.flagged(span.category):
                self.blocked = span.category
                cut = min(cut, span.start)
                break
        released = [s for s in spans if s.end <= cut and result.flagged(s.category)]
        policy = self.guard.policy
        out = redact(self.pending[:cut], [s for s in released if policy.action("output", s.category) == "redact"])
        self.guard.recorder.guardrail_seconds("output", time.perf_counter() - start)
        actions = [(s.category, policy.action("output", s.category)) for s in released]
        if self.blocked is not None:
            actions.append((self.blocked, "block"))
        self.guard._record("output", Decision(out, self.blocked, cut, _dedupe([a for a in actions if a[1] != "off"])))
        self.context = (self.context + self.pending[:cut])[-_CONTEXT_CHARS:]
        self.pending = "" if self.blocked is not None else self.pending[cut:]
        return out
