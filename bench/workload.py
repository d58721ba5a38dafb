"""The benchmark workload: ~200-token prompts, distinct per request or sharing a 150-token system prompt.

Prompts are token ids, so every target (our engine, llama_cpp.Llama, llama-server) reads exactly the same
tokens. A seeded shuffle of sentences makes each request's prompt different from its first token.
"""

from __future__ import annotations

import random

from qanat.engine.executors.llamacpp import LlamaModel

SENTENCES = [
    "The qanat carries water from the foothills to the oasis through a gently sloping tunnel.",
    "Farmers in the Draa valley share the flow by the hour, and a water master keeps the count.",
    "A khettara needs its vertical shafts cleaned every spring, or sand slowly chokes the channel.",
    "In Marrakech the old gardens were fed by underground channels dug centuries ago.",
    "Engineers measure the slope with a level made of a bowl of water and a long straight beam.",
    "The date palms shade the barley, and the barley shades the mint and the beans below.",
    "When the rains fail, the wells drop first, and the old channels keep flowing a little longer.",
    "Every village kept a written record of who owned which share of the water and for how long.",
    "Tourists walk through the restored tunnel and feel the cool air rising from the stream.",
    "The cooperative now pumps with solar panels, but the elders still open the sluice by hand.",
    "Salt builds up in fields that are watered too often and drained too little.",
    "A good channel loses less water to the sand than an open canal loses to the sun.",
    "The surveyor wrote that the tunnel ran eleven kilometres with a drop of only a few metres.",
    "Children learn the names of the shafts the way other children learn the names of streets.",
    "Clay pipes, stone linings and palm trunks each had their place in the old designs.",
    "At night the channel is quiet except for the water and the frogs along its edge.",
]
PROMPT_TOKENS = 200
SHARED_PREFIX_TOKENS = 150


def _text(rng: random.Random, n_sentences: int = 40) -> str:
    return " ".join(rng.choice(SENTENCES) for _ in range(n_sentences))


def distinct_prompts(model: LlamaModel, n: int, seed: int = 0) -> list[list[int]]:
    prompts = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        ids = model.tokenize(f"Request {i}. " + _text(rng), add_special=True)
        prompts.append(ids[:PROMPT_TOKENS])
    return prompts


def shared_prefix_prompts(model: LlamaModel, n: int, seed: int = 0) -> list[list[int]]:
    system = model.tokenize("System: you are a careful assistant. " + _text(random.Random(-1)), add_special=True)
    system = system[:SHARED_PREFIX_TOKENS]
    tails = distinct_prompts(model, n, seed)
    return [system + tail[1 : 1 + PROMPT_TOKENS - SHARED_PREFIX_TOKENS] for tail in tails]
