"""The labelled corpus against the issue's targets: a detector change that loses recall or adds false
positives fails here (the eval script prints the details: bench/guardrails_eval.py)."""

from __future__ import annotations

from bench.guardrails_eval import ALLOWED, evaluate, load
from qanat.guard.scan import Scanner, ScanSettings


def test_corpus_targets() -> None:
    entries = load()
    assert len(entries) >= 300
    assert sum(e["kind"] == "benign" for e in entries) * 2 >= len(entries) - 40  # about half benign
    report = evaluate(entries, Scanner(ScanSettings(languages=ALLOWED)))
    for key, (hits, total) in report["recall"].items():
        target = 0.90 if key.startswith("prompt_injection") else 0.95
        assert hits / total >= target, (key, hits, total, report["misses"])
    false_positives = sum(fp for fp, _ in report["benign"].values())
    benign = sum(n for _, n in report["benign"].values())
    assert false_positives / benign <= 0.03, report["false_positives"]
