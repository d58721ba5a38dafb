"""Speculative decoding, measured: Qanat with `--speculative off` and `ngram`, llama-server without speculation
and with each of its n-gram `--spec-type`s, on the same prompts in the same run.

    flock /tmp/qanat-heavy.lock .venv/bin/python bench/speculative.py --part repetitive [--rounds 2]
    flock /tmp/qanat-heavy.lock .venv/bin/python bench/speculative.py --part open
    flock /tmp/qanat-heavy.lock .venv/bin/python bench/speculative.py --part concurrency
    flock /tmp/qanat-heavy.lock .venv/bin/python bench/speculative.py --part draft [--prompts spelling]

`--baseline DIR` adds `--speculative ngram` as another checkout runs it (`git worktree add DIR <commit>`), to
measure a change of policy against what it replaces, in the same run.

- repetitive: three tasks whose answer repeats the prompt (spelling correction of a 100–300-token text, a record
  given as text extracted as JSON, a function edited and written out again), five variants of each (round i takes
  variant i); one stream, greedy, 192 tokens.
- open: three open-ended prompts, one stream, greedy, 192 tokens; Qanat off vs ngram.
- concurrency: 16 distinct prompts at once, greedy, 128 tokens each; Qanat off vs ngram; aggregate tokens/s.
- draft: the repetitive prompts (or those named by --prompts), one stream, greedy, 192 tokens; Qanat off vs
  `--speculative draft --draft-model default` (the embedded model drafting for itself; `--draft-model PATH` to
  use another) under the cost rule, and with its draft length forced to 4 (`--draft-min 4 --draft-max 4`).

Single-stream figures are decode rates: (tokens - 1) / (last token's arrival - first token's), streamed, so
the prompt's prefill is left out. Each configuration runs every prompt `--rounds` times; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.servers import Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = Path("/tmp/lls/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")

TEXT = (
    "The qanat is an ancient sytem for bringing water from the mountians to the dry plains. Builders first dig a "
    "mother well on the slope of a hill untill they reach the water table. From there they cut a gently sloping "
    "tunel that carries the water for many kilometers, sometimes fourty or fifty, to the fields and the vilages "
    "below. Along the way, vertical shafts are dug every few dozen meters; they let the workers breathe, remove "
    "the soil, and reach the tunel for repairs. Because the water flows underground, very little of it is lost "
    "to evaporation, wich matters a great deal in a hot and windy climate. Each family in the vilage owns a "
    "share of the flow, measured in hours, and a water master keeps the count of evry share and decides when "
    "each field is opened. The system has worked for more than two thousand years, and some qanats are still "
    "in use today, although many have dried up as pumps lowered the water table arround them."
)
RECORD = (
    "Customer file 10472\nName: Amina Rahimi\nDate of birth: 1987-04-12\nEmail: amina.rahimi@example.org\n"
    "Phone: +212 522 48 19 07\nStreet: 14 Rue des Orangers\nCity: Marrakesh\nPostal code: 40000\n"
    "Country: Morocco\nMember since: 2015-09-01\nPlan: premium annual\nLast order: 2026-10-28, order 88213, "
    "3 items, 142.50 EUR\nPreferred language: French\nNewsletter: yes\nNotes: prefers delivery after 18:00"
)
FUNCTION = '''def summarize_orders(orders, currency):
    result = {}
    for order in orders:
        customer = order["customer"]
        if customer not in result:
            result[customer] = {"count": 0, "total": 0.0, "items": 0}
        result[customer]["count"] += 1
        result[customer]["total"] += order["amount"]
        result[customer]["items"] += len(order["items"])
    for customer in result:
        entry = result[customer]
        entry["average"] = entry["total"] / entry["count"]
        entry["currency"] = currency
    return result
'''
SPELLING = "Correct the spelling mistakes in the following text. Write out the whole corrected text and nothing else."
EXTRACT = "Extract every field of this record as one JSON object with snake_case keys. Answer with the JSON only."
# Each task in five variants: round i takes variant i, so no server sees a prompt twice (llama-server's ngram-mod
# and ngram-cache keep n-grams across requests, and would draft a repeated prompt's answer from its last one).
REPETITIVE: dict[str, list[str]] = {
    "spelling": [f"{SPELLING}\n\n{text}" for text in (
        TEXT,
        "Olive trees grow slowley but they live for centurys. In the spring the farmers prune the branchs so that "
        "light can reach the center of the tree. The flowers apear in May and the small green fruits form soon "
        "after. By november the olives turn dark and the harvest begins. Familys spread nets under the trees and "
        "beat the branchs with long sticks untill the fruit falls. The olives are carried to the mill the same day, "
        "becuase they spoil quickly once they are picked. At the mill they are crushed into a paste, and the paste "
        "is pressed to seperate the oil from the water and the pulp. A good tree gives enough oil for a family for "
        "a whole year.",
        "The train leaves the station at seven oclock every morning. Pasengers buy their tickets at the small "
        "window next to the entrence, and the guard checks them before they board. The journey to the coast takes "
        "about three hours, and the line runs through fields, forrests and two long tunels. Most people read or "
        "sleep, but childern like to watch the cows and the horses from the window. When the train arrives, a bus "
        "waits to take travelers to the harbour, where the ferrys leave for the islands twice a day.",
        "Bread has been baked in the old town for hundreds of years. Every neighbourhood has a comunal oven, and "
        "early in the morning families send their dough on wooden boards carryed by children. The baker knows each "
        "famiy by the pattern pressed into their loafs, so nobody takes the wrong bread home. The oven is heated "
        "with wood and the fire is kept burning all day. In the afternoon the same oven is used to roast meat and "
        "vegtables for special ocasions, and the smell fills the narow streets around it.",
        "The library opens at nine oclock and closes at six in the evening. Students come to study in the quite "
        "reading room on the first floor, where talking is not alowed. Books can be borowed for three weeks, and "
        "they can be renewed twice if nobody else has reserved them. The library also has a colection of old maps "
        "and manuscripts, wich can only be read under the supervison of a librarian. Every friday there is a talk "
        "by a local writter, and entrance is free for everyone.",
    )],
    "json": [f"{EXTRACT}\n\n{record}" for record in (
        RECORD,
        "Order 55120\nCustomer: Youssef Alami\nEmail: y.alami@mail.example\nPhone: +33 6 12 34 56 78\n"
        "Product: solar water pump, model SP-400\nQuantity: 2\nUnit price: 389.00 EUR\nShipping: express\n"
        "Address: 7 Avenue Hassan II, Agadir, Morocco\nOrdered on: 2026-11-03\nStatus: shipped",
        "Name: Atlas hiking boot\nBrand: Tizi Gear\nSizes: 38, 39, 40, 41, 42, 43, 44\nColour: brown\n"
        "Weight: 1.2 kg\nWaterproof: yes\nPrice: 129.90 EUR\nIn stock: 54\nWarehouse: Casablanca",
        "Employee 3318\nFull name: Salma Bennani\nDepartment: logistics\nRole: warehouse supervisor\n"
        "Start date: 2019-03-18\nOffice: Tangier Med, building C\nEmail: s.bennani@company.example\n"
        "Phone: +212 539 33 41 20\nManager: Karim Tazi\nContract: permanent, full time\nLanguages: Arabic, French",
        "Flight AT 205\nFrom: Casablanca (CMN)\nTo: Montreal (YUL)\nDeparture: 2026-12-14 13:35\n"
        "Arrival: 2026-12-14 17:10\nAircraft: Boeing 787-8\nPassenger: Omar El Idrissi\nSeat: 23A\n"
        "Baggage: 2 pieces, 23 kg each\nBooking reference: QX7L2M\nStatus: confirmed",
    )],
    "code": [
        "Rename the variable `result` to `summary` in this Python function and write out the whole function."
        f"\n\n{FUNCTION}",
        "Add a docstring to this Python function and return the complete function.\n\n"
        "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError(\"window must be "
        "positive\")\n    averages = []\n    total = 0.0\n    for i, value in enumerate(values):\n"
        "        total += value\n        if i >= window:\n            total -= values[i - window]\n"
        "        if i >= window - 1:\n            averages.append(total / window)\n    return averages\n",
        "Rename the function `parse_line` to `parse_record` and write out the whole code.\n\n"
        "def parse_line(line):\n    fields = line.strip().split(\",\")\n    if len(fields) != 3:\n"
        "        return None\n    name, age, city = fields\n    return {\"name\": name, \"age\": int(age), "
        "\"city\": city}\n\ndef load(path):\n    records = []\n    with open(path) as f:\n        for line in f:\n"
        "            record = parse_line(line)\n            if record is not None:\n"
        "                records.append(record)\n    return records\n",
        "Add type hints to this Python function and write out the whole function.\n\n"
        "def count_words(text, ignore_case):\n    counts = {}\n    for word in text.split():\n"
        "        if ignore_case:\n            word = word.lower()\n        word = word.strip(\".,;:!?\")\n"
        "        if not word:\n            continue\n        counts[word] = counts.get(word, 0) + 1\n"
        "    return sorted(counts.items(), key=lambda item: item[1], reverse=True)\n",
        "Change this Python function so that it returns None instead of raising KeyError, and write out the whole "
        "function.\n\ndef price_with_tax(catalog, product_id, country):\n    rates = {\"MA\": 0.20, \"FR\": 0.20, "
        "\"DE\": 0.19, \"ES\": 0.21}\n    product = catalog[product_id]\n    rate = rates[country]\n"
        "    price = product[\"price\"] * (1 + rate)\n    return round(price, 2)\n",
    ],
}
OPEN: dict[str, list[str]] = {
    "story": ["Write a short story about a lighthouse keeper who finds a message in a bottle."],
    "explain": ["Explain how a refrigerator works to a ten-year-old."],
    "ideas": ["Give me ideas for a weekend trip with friends, with a short reason for each."],
}
TOPICS = ["volcanoes", "the moon", "bees", "the Roman empire", "rainbows", "chess", "penguins", "bread",
          "glaciers", "the violin", "tea", "deserts", "octopuses", "bridges", "comets", "the printing press"]


@dataclass(frozen=True)
class Target:
    name: str
    argv: list[str]
    port: int
    qanat: bool
    root: Path = ROOT  # the checkout whose qanat runs


def qanat(name: str, port: int, *extra: str, root: Path = ROOT) -> Target:
    return Target(name, [sys.executable, "-m", "qanat.cli", "serve", "--ctx", "1024",
                         "--parallel", "16", "--no-webui", *extra], port, True, root)


def baseline(checkout: str | None, port: int) -> list[Target]:
    """`--baseline DIR`: the same ngram server from another checkout (e.g. `git worktree add /tmp/base main`),
    to compare a change of policy with what it replaces in the same run."""
    if checkout is None:
        return []
    root = Path(checkout).resolve()
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return [qanat(f"qanat ngram @{commit}", port, "--speculative", "ngram", root=root)]


def llama_server(name: str, port: int, *extra: str) -> Target:
    model = subprocess.run([sys.executable, "-c", "from qanat.models.locate import default_model_path as p; "
                            "print(p())"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    # Flash attention off, as Qanat's `auto` runs on a CPU (the same ggml kernels, so the same gain); AMX on
    # (repacked weights) once its libggml-cpu carries third_party/llama-cpp-python/amx-tile-config.patch.
    return Target(name, [str(LLAMA_SERVER), "-m", model, "-t", "2", "-c", "4096", "-np", "1",
                         "-fa", "off", "--no-webui", *extra], port, False)


def start(target: Target) -> Server:
    return Server(target.name, target.argv, env={**os.environ, "PYTHONPATH": str(target.root)}, cwd=target.root,
                  port=target.port)


@dataclass
class Run:
    text: str
    tokens: int
    decode_tok_s: float
    wall_s: float
    drafted: int | None = None
    accepted: int | None = None


def chat(port: int, prompt: str, max_tokens: int) -> Run:
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, arrivals, tokens = [], [], 0
    timings: dict[str, Any] = {}
    start_s = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            timings = chunk.get("timings") or timings
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    arrivals.append(time.perf_counter())
    wall_s = time.perf_counter() - start_s
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    run = Run("".join(text), tokens, (tokens - 1) / span if span else 0.0, wall_s)
    if "draft_n" in timings:
        run.drafted, run.accepted = timings["draft_n"], timings.get("draft_n_accepted")
    return run


def metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def single_stream(targets: list[Target], prompts: dict[str, list[str]], rounds: int, max_tokens: int) -> None:
    """Every target up at once; each round runs every prompt (round i: each task's variant i, cycling) on every
    target, the order rotating, so a noisy neighbour on the machine hits all targets alike."""
    rows: dict[str, dict[str, list[Run]]] = {t.name: {n: [] for n in prompts} for t in targets}
    acceptance: dict[str, str] = {}
    servers = [start(t) for t in targets]
    try:
        for target in targets:
            chat(target.port, "Hello", 8)  # warm-up
        for i in range(rounds):
            for name, variants in prompts.items():
                prompt = variants[i % len(variants)]
                for j in range(len(targets)):
                    target = targets[(i + j) % len(targets)]
                    rows[target.name][name].append(chat(target.port, prompt, max_tokens))
        for target in targets:
            if target.qanat:
                drafted = metric(target.port, "qanat_spec_decode_num_draft_tokens_total")
                accepted = metric(target.port, "qanat_spec_decode_num_accepted_tokens_total")
                steps = metric(target.port, "qanat_spec_decode_num_drafts_total")
                acceptance[target.name] = (f"{int(accepted)}/{int(drafted)} = {accepted / drafted:.2f}, "
                                           f"{drafted / steps:.1f} per draft" if drafted else "no drafts")
            else:
                runs = [r for rs in rows[target.name].values() for r in rs if r.drafted]
                drafted_n = sum(r.drafted or 0 for r in runs)
                accepted_n = sum(r.accepted or 0 for r in runs)
                acceptance[target.name] = (f"{accepted_n}/{drafted_n} = {accepted_n / drafted_n:.2f}"
                                           if drafted_n else "no drafts")
    finally:
        for server in servers:
            server.stop()
    for target in targets:
        print(target.name, {n: [round(r.decode_tok_s, 1) for r in runs] for n, runs in rows[target.name].items()},
              file=sys.stderr)
    base = targets[0].name
    names = list(prompts)
    print(f"\n| target | {' | '.join(f'{n} tok/s' for n in names)} | mean | × {base} | paired × {base} | "
          f"same text as {base} | drafts accepted |")
    print("|---|" + "---|" * (len(names) + 5))
    base_mean = statistics.mean(statistics.median(r.decode_tok_s for r in rows[base][n]) for n in names)
    for target in targets:
        medians = [statistics.median(r.decode_tok_s for r in rows[target.name][n]) for n in names]
        mean = statistics.mean(medians)
        pairs = [(mine, theirs) for n in names for mine, theirs in
                 zip(rows[target.name][n], rows[base][n], strict=True)]
        same = sum(mine.text == theirs.text for mine, theirs in pairs)
        # Each run against the base's run of the same prompt in the same round (adjacent in time): the machine's
        # drift between rounds and the variants' own differences cancel.
        paired = statistics.median(mine.decode_tok_s / theirs.decode_tok_s for mine, theirs in pairs)
        print(f"| {target.name} | {' | '.join(f'{m:.1f}' for m in medians)} | {mean:.1f} | "
              f"{mean / base_mean:.2f} | {paired:.2f} | {same}/{len(pairs)} | {acceptance[target.name]} |")


def concurrency(targets: list[Target], rounds: int, max_tokens: int) -> None:
    prompts = [f"Tell me about {topic}, in a few paragraphs." for topic in TOPICS]
    results: dict[str, list[float]] = {t.name: [] for t in targets}
    servers = [start(t) for t in targets]  # both up; they take turns, one at a time
    try:
        for target in targets:
            chat(target.port, "Hello", 8)
        for i in range(rounds):
            for target in targets if i % 2 == 0 else reversed(targets):
                start_s = time.perf_counter()
                with ThreadPoolExecutor(len(prompts)) as pool:
                    runs = list(pool.map(lambda p, port=target.port: chat(port, p, max_tokens), prompts))
                results[target.name].append(sum(r.tokens for r in runs) / (time.perf_counter() - start_s))
        notes = {t.name: f"{int(metric(t.port, 'qanat_spec_decode_num_accepted_tokens_total'))}/"
                         f"{int(metric(t.port, 'qanat_spec_decode_num_draft_tokens_total'))}" for t in targets}
    finally:
        for server in servers:
            server.stop()
    base = statistics.median(results[targets[0].name])
    print(f"\n| target | aggregate tok/s per round | median | × {targets[0].name} | drafts accepted |")
    print("|---|---|---|---|---|")
    for target in targets:
        values = results[target.name]
        print(f"| {target.name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} | "
              f"{statistics.median(values) / base:.2f} | {notes[target.name]} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["repetitive", "open", "concurrency", "draft"], required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--llama-server-types", default="none,ngram-simple,ngram-mod,ngram-map-k,ngram-cache")
    parser.add_argument("--prompts", default=None, help="comma-separated names of the part's prompts to run")
    parser.add_argument("--draft-model", default="default", help="--part draft: the draft model")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also run `--speculative ngram` from this checkout (repetitive, open, concurrency)")
    args = parser.parse_args()
    off, on = qanat("qanat off", 8301), qanat("qanat ngram", 8302, "--speculative", "ngram")
    base = baseline(args.baseline, 8309)
    if args.part == "draft":
        draft = ("--speculative", "draft", "--draft-model", args.draft_model)
        prompts = {n: p for n, p in REPETITIVE.items() if args.prompts is None or n in args.prompts.split(",")}
        single_stream([off, qanat("qanat draft", 8303, *draft),
                       qanat("qanat draft k=4", 8304, *draft, "--draft-min", "4", "--draft-max", "4")],
                      prompts, args.rounds, args.max_tokens or 192)
    elif args.part == "repetitive":
        servers = [llama_server(f"llama-server {t}", 8310 + i, "--spec-type", t)
                   for i, t in enumerate(args.llama_server_types.split(","))]
        single_stream([off, on, *base, *servers], REPETITIVE, args.rounds, args.max_tokens or 192)
    elif args.part == "open":
        single_stream([off, on, *base], OPEN, args.rounds, args.max_tokens or 192)
    else:
        concurrency([off, on, *base], args.rounds, args.max_tokens or 128)
    return 0


if __name__ == "__main__":
    sys.exit(main())
