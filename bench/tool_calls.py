"""Tool-call reliability: how many varied requests with a forced call (tool_choice "required" or a named
function) come back with calls whose arguments validate against the tool's schema, streamed and not, and
whether each stream reassembles to the call of the same request sent unstreamed.

    .venv/bin/qanat serve --port 8000 --threads 2 --parallel 8 --ctx 1024 --deterministic
    .venv/bin/python bench/tool_calls.py --url http://127.0.0.1:8000 --rounds 3

Round 0 is greedy; later rounds sample at temperature 1 with seeds 1, 2, ... With --deterministic, a request's
output does not depend on what runs beside it, so a stream and its unstreamed twin must match exactly.
The 20 cases are also what tests/e2e/test_tools.py asserts on.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from jsonschema import Draft202012Validator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_TEXT = {"type": "string"}
TOOLS: dict[str, dict[str, Any]] = {t["function"]["name"]: t for t in [
    _tool("get_weather", "Current weather in a city",
          {"city": _TEXT, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _tool("get_time", "Current local time in a city", {"city": _TEXT}, ["city"]),
    _tool("convert_currency", "Convert an amount of money",
          {"amount": {"type": "number"}, "from_currency": {"type": "string", "enum": ["EUR", "USD", "MAD", "JPY"]},
           "to_currency": {"type": "string", "enum": ["EUR", "USD", "MAD", "JPY"]}},
          ["amount", "from_currency", "to_currency"]),
    _tool("send_email", "Send an email", {"to": _TEXT, "subject": _TEXT, "body": _TEXT}, ["to", "subject"]),
    _tool("set_alarm", "Set an alarm", {"hour": {"type": "integer"}, "minute": {"type": "integer"},
                                        "repeat_daily": {"type": "boolean"}}, ["hour", "minute"]),
    _tool("add_todos", "Add items to the to-do list",
          {"items": {"type": "array", "items": _TEXT}, "priority": {"type": "string", "enum": ["low", "high"]}},
          ["items"]),
    _tool("search_books", "Search the library catalogue",
          {"query": _TEXT, "filters": {"type": "object", "properties": {"year": {"type": "integer"},
                                                                         "language": _TEXT}}}, ["query"]),
    _tool("get_stock_price", "Latest price of a stock", {"symbol": _TEXT}, ["symbol"]),
    _tool("tell_joke", "Tell a random joke", {}, []),
]}

# (user message, the tool a named tool_choice forces, the other tools offered beside it)
CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("What's the weather like in Paris?", "get_weather", ("get_time", "tell_joke")),
    ("Is it cold in Oslo today? Answer in fahrenheit.", "get_weather", ("convert_currency", "set_alarm")),
    ("What time is it in Tokyo right now?", "get_time", ("get_weather", "search_books")),
    ("I need the local time in Casablanca.", "get_time", ("send_email", "get_stock_price")),
    ("How much is 250 euros in dollars?", "convert_currency", ("get_weather", "get_time")),
    ("Convert 1000 Moroccan dirhams to yen please.", "convert_currency", ("add_todos", "tell_joke")),
    ("Email bob@example.com that the meeting moved to 3pm.", "send_email", ("get_time", "set_alarm")),
    ("Send a thank-you note to amina@example.org.", "send_email", ("search_books", "get_weather")),
    ("Wake me up at 6:30 every day.", "set_alarm", ("get_time", "tell_joke")),
    ("Set an alarm for 14:05.", "set_alarm", ("convert_currency", "get_weather")),
    ("Add milk, eggs and bread to my list.", "add_todos", ("send_email", "get_stock_price")),
    ("Remind me to call the plumber, it's urgent.", "add_todos", ("set_alarm", "get_time")),
    ("Find books about irrigation in the Sahara.", "search_books", ("get_weather", "add_todos")),
    ("Any French novels from 1950 about the sea?", "search_books", ("tell_joke", "convert_currency")),
    ("What's Apple trading at?", "get_stock_price", ("get_time", "send_email")),
    ("Give me the latest NVDA quote.", "get_stock_price", ("search_books", "set_alarm")),
    ("Tell me something funny.", "tell_joke", ("get_weather", "add_todos")),
    ("I'm bored, make me laugh.", "tell_joke", ("get_stock_price", "get_time")),
    ("Weather in Marrakech, and is it raining?", "get_weather", ("get_time", "convert_currency")),
    ("What time is it in New York, in 24-hour format?", "get_time", ("send_email", "tell_joke")),
]


@dataclass(frozen=True)
class Outcome:
    calls: tuple[tuple[str, str], ...]  # (name, arguments JSON text)
    finish_reason: str | None
    ids_ok: bool = True  # streamed: each call's id and name came first, once

    def validates(self, allowed: set[str]) -> bool:
        """At least one call; each names an allowed tool and its arguments parse and match its schema."""
        if not self.calls or self.finish_reason != "tool_calls" or not self.ids_ok:
            return False
        for name, arguments in self.calls:
            if name not in allowed:
                return False
            try:
                value = json.loads(arguments)
            except json.JSONDecodeError:
                return False
            if not Draft202012Validator(TOOLS[name]["function"]["parameters"]).is_valid(value):
                return False
        return True


def request(case: tuple[str, str, tuple[str, ...]], named: bool, seed: int | None,
            frequency_penalty: float = 0.0) -> dict[str, Any]:
    prompt, target, others = case
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": [TOOLS[target]] + [TOOLS[o] for o in others],
        "tool_choice": {"type": "function", "function": {"name": target}} if named else "required",
        "max_tokens": 96,
        "parallel_tool_calls": False,
        "frequency_penalty": frequency_penalty,
    }
    return {**body, "temperature": 0} if seed is None else {**body, "temperature": 1.0, "seed": seed}


def ask(client: openai.OpenAI, model: str, body: dict[str, Any], stream: bool) -> Outcome:
    if not stream:
        reply = client.chat.completions.create(model=model, **body)
        calls = reply.choices[0].message.tool_calls or []
        return Outcome(tuple((c.function.name, c.function.arguments) for c in calls),  # type: ignore[union-attr]
                       reply.choices[0].finish_reason)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish, ids_ok = None, True
    for chunk in client.chat.completions.create(model=model, stream=True, **body):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for part in chunk.choices[0].delta.tool_calls or []:
            if part.id is not None:  # a call opens: id, type and name, arguments not yet
                ids_ok &= part.index not in names and part.function is not None and bool(part.function.name)
                names[part.index] = part.function.name if part.function and part.function.name else ""
                arguments[part.index] = ""
            elif part.index not in names:
                ids_ok = False  # arguments before their call's id and name
            if part.function is not None and part.function.arguments:
                arguments[part.index] = arguments.get(part.index, "") + part.function.arguments
    return Outcome(tuple((names[i], arguments[i]) for i in sorted(names)), finish, ids_ok)


@dataclass(frozen=True)
class Tally:
    valid: int
    total: int
    reassembled: int  # streams identical to their unstreamed twin


def measure(client: openai.OpenAI, model: str, named: bool, seed: int | None, frequency_penalty: float = 0.0,
            workers: int = 8) -> Tally:
    """Every case, streamed and not, concurrently."""
    jobs = [(case, stream) for case in CASES for stream in (False, True)]

    def one(job: tuple[tuple[str, str, tuple[str, ...]], bool]) -> Outcome:
        return ask(client, model, request(job[0], named, seed, frequency_penalty), job[1])

    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(one, jobs))
    allowed = [{case[1]} if named else {case[1], *case[2]} for case, _ in jobs]
    valid = sum(o.validates(a) for a, o in zip(allowed, outcomes, strict=True))
    pairs = zip(outcomes[0::2], outcomes[1::2], strict=True)
    return Tally(valid, len(jobs), sum(a.calls == b.calls for a, b in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frequency-penalty", type=float, nargs="+", default=[0.0, 0.5])
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused", max_retries=0, timeout=1800)
    model = client.models.list().data[0].id
    print("| tool_choice | sampling | frequency_penalty | valid calls (streamed + not) | streams = unstreamed |\n"
          "|---|---|---|---|---|", flush=True)
    for round_ in range(args.rounds):
        seed = None if round_ == 0 else round_
        for penalty in args.frequency_penalty:
            for named in (False, True):
                tally = measure(client, model, named, seed, penalty)
                label = "named" if named else "required"
                sampling = "greedy" if seed is None else f"T=1 seed {seed}"
                print(f"| {label} | {sampling} | {penalty:g} | {tally.valid}/{tally.total} | "
                      f"{tally.reassembled}/{len(CASES)} |", flush=True)


if __name__ == "__main__":
    main()
