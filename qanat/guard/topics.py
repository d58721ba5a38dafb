"""Blocked topics: a deployment's words and phrases, folded like the text and compiled once into one regex,
so "Cannabis", "كانابيس" and "القِنَّب" match however they are written."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from qanat.guard.normalize import normalize
from qanat.guard.spans import Span


class TopicMatcher:
    def __init__(self, topics: Mapping[str, Sequence[str]]) -> None:
        """`topics`: a topic name -> its phrases. Each phrase matches as whole words, spaces flexible."""
        self._topic_of: dict[str, str] = {}
        alternatives = []
        for topic, phrases in topics.items():
            for phrase in phrases:
                folded = " ".join(normalize(phrase).text.split())
                if folded and folded not in self._topic_of:
                    self._topic_of[folded] = topic
                    alternatives.append(r"[\s\-]+".join(re.escape(word) for word in folded.split(" ")))
        alternatives.sort(key=len, reverse=True)  # the longest phrase wins where two start together
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)") if alternatives else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def find(self, text: str) -> list[Span]:
        if self._pattern is None:
            return []
        spans = []
        for m in self._pattern.finditer(text):
            topic = self._topic_of.get(" ".join(re.split(r"[\s\-]+", m.group())), "")
            spans.append(Span("blocked_topic", m.start(), m.end(), 1.0, topic))
        return spans
