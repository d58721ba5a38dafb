"""Each policy's choice, exactly, on hand-made replica views."""

from __future__ import annotations

from qanat.engine.client import ChatPrompt, TextPrompt, TokenPrompt
from qanat.router.policies import (
    LeastLoad,
    LowestEnergy,
    PrefixAware,
    ReplicaView,
    RoundRobin,
    RouteRequest,
    SessionAffinity,
    prompt_blocks,
)


def views(*loads: int) -> list[ReplicaView]:
    return [ReplicaView(f"r{i}", capacity=4, outstanding=load) for i, load in enumerate(loads)]


def ask(text: str, session: str | None = None) -> RouteRequest:
    return RouteRequest(TextPrompt(text), max_tokens=16, session=session)


def test_round_robin_takes_turns() -> None:
    policy, replicas = RoundRobin(), views(0, 0, 0)
    assert [policy.choose(replicas, ask("x")).name for _ in range(5)] == ["r0", "r1", "r2", "r0", "r1"]


def test_least_load_counts_requests_then_tokens() -> None:
    replicas = views(2, 1, 1)
    replicas[1].outstanding_tokens, replicas[2].outstanding_tokens = 500, 100
    assert LeastLoad().choose(replicas, ask("x")).name == "r2"


def test_prefix_sends_a_shared_prefix_where_it_went_before() -> None:
    policy, replicas = PrefixAware(), views(0, 0)
    system = "You are a careful assistant for water engineers. " * 8  # several blocks
    first = policy.choose(replicas, ask(system + "question one"))
    first.outstanding += 1  # it is busy with that one now: least load alone would pick the other
    again = policy.choose(replicas, ask(system + "question two"))
    assert again is first
    other = policy.choose(replicas, ask("a different system prompt entirely " * 8))
    assert other is not first  # no match: least load


def test_prefix_yields_to_load_when_replicas_are_unbalanced() -> None:
    policy, replicas = PrefixAware(), views(0, 0)
    system = "shared prefix " * 40
    hot = policy.choose(replicas, ask(system + "1"))
    hot.outstanding = 12  # far busier than the other (0): balance first
    assert policy.choose(replicas, ask(system + "2")) is not hot


def test_prefix_blocks_chain_so_equal_hashes_mean_equal_prefixes() -> None:
    a = prompt_blocks(TextPrompt("x" * 64 + "y" * 64))
    b = prompt_blocks(TextPrompt("z" * 64 + "y" * 64))
    assert a[1] != b[1]  # same second block, different first: different chains
    assert prompt_blocks(TokenPrompt(tuple(range(40))))[:2] == prompt_blocks(TokenPrompt(tuple(range(33))))[:2]
    chat = prompt_blocks(ChatPrompt(({"role": "system", "content": "s" * 100}, {"role": "user", "content": "q"})))
    assert len(chat) == 2


def test_session_sticks_and_moves_only_when_its_replica_leaves() -> None:
    policy, replicas = SessionAffinity(), views(0, 0, 0)
    homes = {s: policy.choose(replicas, ask("x", session=s)).name for s in (f"user-{i}" for i in range(30))}
    assert len(set(homes.values())) == 3  # spread over all replicas
    assert all(policy.choose(replicas, ask("y", session=s)).name == home for s, home in homes.items())
    survivors = [r for r in replicas if r.name != "r1"]
    for session, home in homes.items():
        now = policy.choose(survivors, ask("z", session=session)).name
        assert now == home or home == "r1"  # only r1's sessions move
    assert policy.choose(views(3, 0, 2), ask("no session")).name == "r1"


def test_energy_prefers_measured_low_joules_unless_saturated() -> None:
    policy, replicas = LowestEnergy(), views(0, 0)
    assert policy.choose(replicas, ask("x")).name == "r0"  # neither measured: measure one
    replicas[0].joules, replicas[0].tokens = 10.0, 100  # 0.1 J/token
    assert policy.choose(replicas, ask("x")).name == "r1"  # r1 not measured yet
    replicas[1].joules, replicas[1].tokens = 2.0, 100  # 0.02 J/token
    assert policy.choose(replicas, ask("x")).name == "r1"
    replicas[1].outstanding = 4  # at capacity: it cannot meet latency, the next best serves
    assert policy.choose(replicas, ask("x")).name == "r0"
