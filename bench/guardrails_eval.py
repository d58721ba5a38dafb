"""Guardrails on the labelled corpus: recall per category and per language, false positives on the benign
half, language identification, and scan latency per KB of text.

    PYTHONPATH=. .venv/bin/python bench/guardrails_eval.py [--latency-rounds 2000] [--out bench/results/guardrails.json]

Targets (issue 13): PII recall >= 0.95 per category; injection recall >= 0.90 per language; false positives
<= 3 % of benign texts; p50 <= 1 ms and p99 <= 5 ms per KB. Prints Markdown for docs/guardrails.md and lists
every miss and false positive, so a change that trades one for the other shows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qanat.guard.scan import Scanner, ScanResult, ScanSettings  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "guardrails_corpus.jsonl"
ALLOWED = ("ar", "ary", "zgh", "fr", "en")
DETECTOR_CATEGORIES = ("pii", "prompt_injection", "blocked_topic", "language")  # what a benign text must not trip
_EXPECTED_LANGUAGE = {"ary-Latn": "ary", "zgh-Latn": "zgh"}


def load(path: Path = CORPUS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def found(result: ScanResult, category: str, value: str | None) -> bool:
    if value is None:
        return result.flagged(category)
    start = result.text.find(value)
    assert start >= 0, (value, result.text)
    end = start + len(value)
    return any(s.category == category and s.start <= start and s.end >= end for s in result.spans)


def evaluate(entries: list[dict[str, Any]], scanner: Scanner) -> dict[str, Any]:
    recall: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> [hits, total]
    benign: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # lang -> [false positives, total]
    language: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # lang -> [right, total]
    misses: list[str] = []
    false_positives: list[str] = []
    for entry in entries:
        result = scanner.scan(entry["text"])
        lang = entry["lang"]
        for category, value in entry["expect"]:
            key = f"{category} | {lang}" if category == "prompt_injection" else category
            hit = found(result, category, value)
            for k in (key, f"{category} (all)"):
                recall[k][0] += hit
                recall[k][1] += 1
            if not hit:
                misses.append(f"[{lang}] {category} {value!r} in {entry['text']!r}: "
                              f"{[(s.category, s.rule, entry['text'][s.start:s.end]) for s in result.spans]}")
        if entry["kind"] == "benign":
            tripped = [c for c in DETECTOR_CATEGORIES if result.flagged(c)]
            benign[lang][0] += bool(tripped)
            benign[lang][1] += 1
            if tripped:
                false_positives.append(f"[{lang}] {entry['text']!r}: "
                                       f"{[(s.category, s.rule, entry['text'][s.start:s.end]) for s in result.spans]}")
        if lang != "mixed" and result.language is not None:
            want = _EXPECTED_LANGUAGE.get(lang, lang)
            language[lang][0] += result.language.language == want
            language[lang][1] += 1
    return {"recall": dict(recall), "benign": dict(benign), "language": dict(language), "misses": misses,
            "false_positives": false_positives}


def latency_per_kb(entries: list[dict[str, Any]], scanner: Scanner, rounds: int) -> dict[str, float]:
    """Full scans (every detector and the language id) of 1 KB documents cut from the shuffled corpus."""
    rng = random.Random(0)
    texts = [e["text"] for e in entries]
    docs = []
    for _ in range(64):
        rng.shuffle(texts)
        doc = ""
        for t in texts:
            if len((doc + " " + t).encode()) > 1024:
                break
            doc += " " + t
        docs.append(doc)
    for doc in docs:  # warm: caches, the fastText model, regex compilation
        scanner.scan(doc)
    timings_ms = []
    for i in range(rounds):
        doc = docs[i % len(docs)]
        start = time.perf_counter()
        scanner.scan(doc)
        timings_ms.append((time.perf_counter() - start) * 1000 * 1024 / len(doc.encode()))
    timings_ms.sort()
    return {"p50_ms_per_kb": statistics.median(timings_ms), "p99_ms_per_kb": timings_ms[int(0.99 * len(timings_ms))],
            "mean_ms_per_kb": statistics.fmean(timings_ms), "docs": len(docs), "rounds": rounds}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| detection | recall | found / expected |", "|---|---|---|"]
    for key in sorted(report["recall"]):
        hits, total = report["recall"][key]
        lines.append(f"| {key} | {hits / total:.3f} | {hits} / {total} |")
    lines += ["", "| benign texts | false positives | rate |", "|---|---|---|"]
    fp_all = sum(v[0] for v in report["benign"].values())
    n_all = sum(v[1] for v in report["benign"].values())
    for lang, (fp, n) in sorted(report["benign"].items()):
        lines.append(f"| {lang} | {fp} / {n} | {fp / n:.1%} |")
    lines.append(f"| all | {fp_all} / {n_all} | {fp_all / n_all:.1%} |")
    lines += ["", "| language | identified right | rate |", "|---|---|---|"]
    for lang, (right, n) in sorted(report["language"].items()):
        lines.append(f"| {lang} | {right} / {n} | {right / n:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-rounds", type=int, default=2000)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--latency-text", choices=["all", "benign"], default="all",
                        help="cut the 1 KB documents from every text (a third are attacks) or from benign ones only")
    parser.add_argument("--split", choices=["tuning", "held_out", "held_out_2", "all"], default="all",
                        help="held_out_2: texts written after the last rule change, never tuned on "
                             "(held_out was, once: see docs/guardrails.md)")
    args = parser.parse_args()
    corpus = load()
    scanner = Scanner(ScanSettings(languages=ALLOWED))
    splits = ("tuning", "held_out", "held_out_2") if args.split == "all" else (args.split,)
    report: dict[str, Any] = {}
    for split in splits:
        entries = [e for e in corpus if e.get("split", "tuning") == split]
        report[split] = evaluate(entries, scanner)
        kinds = {k: sum(e["kind"] == k for e in entries) for k in ("pii", "injection", "benign")}
        print(f"## {split}: {len(entries)} texts {kinds}\n")
        print(markdown(report[split]))
        for title, items in (("misses", report[split]["misses"]), ("false positives",
                                                                   report[split]["false_positives"])):
            print(f"{title} ({len(items)}):")
            for item in items:
                print("  " + item)
        print()
    if args.latency_rounds:
        source = corpus if args.latency_text == "all" else [e for e in corpus if e["kind"] == "benign"]
        report["latency"] = latency_per_kb(source, scanner, args.latency_rounds)
        lat = report["latency"]
        print(f"Latency (full scan, {lat['docs']} 1 KB documents cut from {args.latency_text} texts, "
              f"{lat['rounds']} scans): "
              f"p50 {lat['p50_ms_per_kb']:.3f} ms/KB, p99 {lat['p99_ms_per_kb']:.3f} ms/KB, "
              f"mean {lat['mean_ms_per_kb']:.3f} ms/KB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
