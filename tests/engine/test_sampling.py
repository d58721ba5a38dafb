"""SamplingParams and the one table of limits the API and the engine share."""

from __future__ import annotations

import pytest

from qanat.engine.errors import InvalidRequestError
from qanat.engine.sampling import LIMITS, ConstraintKind, OutputConstraint, SamplingParams
from qanat.serving.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
     ({"presence_penalty": 3}, "presence_penalty"), ({"stop": ("",)}, "stop"), ({"logprobs": 50}, "logprobs"),
     ({"logit_bias": ((5, float("-inf")),)}, "logit_bias"),
     # Regression: a grammar that had finished, with end-of-generation banned, aborted the server process.
     ({"ignore_eos": True, "constraint": OutputConstraint(ConstraintKind.GRAMMAR, 'root ::= "yes"')}, "ignore_eos"),
     ({"temperature": 2.5}, "temperature"), ({"logit_bias": ((5, 101.0),)}, "logit_bias")],
)
def test_invalid_sampling_values_are_named(kwargs: dict, param: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError, match=param) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param



def test_api_and_engine_share_one_table_of_limits() -> None:
    chat = ChatCompletionRequest.model_json_schema()["properties"]
    completion = CompletionRequest.model_json_schema()["properties"]

    def bounds(prop: dict) -> tuple[float, float]:  # type: ignore[type-arg]
        number = next(p for p in prop["anyOf"] if p["type"] in ("number", "integer")) if "anyOf" in prop else prop
        return number.get("minimum", number.get("exclusiveMinimum")), number["maximum"]

    assert bounds(chat["temperature"]) == (LIMITS["temperature"].lo, LIMITS["temperature"].hi)
    assert bounds(chat["top_logprobs"]) == bounds(completion["logprobs"]) == (0, LIMITS["logprobs"].hi)
    assert bounds(chat["top_p"]) == (0, 1) and chat["top_p"]["anyOf"][0].get("exclusiveMinimum") == 0
    # Every bound the API states, the engine enforces with the same numbers.
    SamplingParams(temperature=LIMITS["temperature"].hi, logprobs=int(LIMITS["logprobs"].hi))
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=LIMITS["temperature"].hi + 0.01)
