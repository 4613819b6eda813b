"""Metrics: the `type` label is bounded (a type's series go with its last order, a cap with an
overflow bucket), and the secure endpoint's decisions and cache. The real endpoint on the real
API server (TokenReview, SubjectAccessReview, HTTPS) is in tests/integration/test_operations.py."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from tests.unit.orders import AGENT_A, NOW, read, store
from tests.unit.test_engine import Harness, body, initialised, run
from workorder_operator import lifecycle as lc
from workorder_operator import metrics
from workorder_operator.errors import Refused, Transient
from workorder_operator.kube import Access
from workorder_operator.metrics import OTHER, AccessCache, TypeLabels
from workorder_operator.targeting import AgentIdentity


def families() -> tuple[CollectorRegistry, PromCounter, Histogram]:
    registry = CollectorRegistry()
    counter = PromCounter("t_total", "a counter", ["transition", "type"], registry=registry)
    histogram = Histogram("t_seconds", "a histogram", ["type", "outcome"], buckets=(1, 10), registry=registry)
    return registry, counter, histogram


def types_in(registry: CollectorRegistry) -> set[str]:
    return {s.labels["type"] for family in registry.collect() for s in family.samples if "type" in s.labels}


def count(types: TypeLabels, counter: PromCounter, histogram: Histogram, work_type: str) -> None:
    label = types.label(work_type)
    types.labels(counter, label, "claim", label).inc()
    types.labels(counter, label, "complete", label).inc()
    types.labels(histogram, label, label, "complete").observe(2)


# --- the type label: series go with the last order ----------------------------------------------


def test_a_types_series_go_when_its_last_order_goes() -> None:
    registry, counter, histogram = families()
    types = TypeLabels(cap=10)
    types.seen("a")
    types.seen("a")
    types.seen("b")
    count(types, counter, histogram, "a")
    count(types, counter, histogram, "b")
    assert types_in(registry) == {"a", "b"}
    types.gone("a")
    assert types_in(registry) == {"a", "b"}, "one order of `a` is still there"
    types.gone("a")
    assert types_in(registry) == {"b"}
    assert types.live() == {"b": 1}
    types.gone("b")
    assert types_in(registry) == set()
    assert types.live() == {}
    # A type that comes back starts afresh.
    types.seen("a")
    count(types, counter, histogram, "a")
    assert counter.labels("claim", "a")._value.get() == 1


def test_live_types_beyond_the_cap_share_the_overflow_bucket_while_they_live() -> None:
    registry, counter, histogram = families()
    types = TypeLabels(cap=2)
    for kind in ("a", "b", "c", "d"):
        types.seen(kind)
        count(types, counter, histogram, kind)
    assert types_in(registry) == {"a", "b", OTHER}
    assert counter.labels("claim", OTHER)._value.get() == 2  # c and d
    # A slot that frees up does not move a live overflow type: its series never split.
    types.gone("a")
    assert types.label("c") == OTHER
    assert types_in(registry) == {"b", OTHER}
    # ... but a type seen afterwards takes it.
    types.seen("e")
    assert types.label("e") == "e"
    types.gone("c")
    assert OTHER in types_in(registry), "d is still counted there"
    types.gone("d")
    assert types_in(registry) == {"b"}


def test_the_cap_bounds_the_series_whatever_types_exist() -> None:
    registry, counter, histogram = families()
    types = TypeLabels(cap=5)
    for i in range(200):
        types.seen(f"t{i}")
        count(types, counter, histogram, f"t{i}")
    assert len(types_in(registry)) == 6
    for i in range(200):
        types.gone(f"t{i}")
    assert types_in(registry) == set()


def test_the_engine_reports_every_order_it_tracks_and_forgets() -> None:
    """200 throw-away work types, each claimed while the engine leads (its transitions counted),
    then deleted: none of their series is left, on the leader's counters nor the state gauge."""
    types = TypeLabels(cap=1000)
    bodies = [initialised(body(i, {"workType": f"throwaway-{i}"})) for i in range(200)]

    async def test() -> None:
        h = Harness(bodies, types=types)
        h.engine.lead()
        assert len(types.live()) == 200
        claimed = [store(b, lc.claim(read(b), AgentIdentity(AGENT_A), NOW)) for b in bodies]
        for b in claimed:
            h.engine.observe("MODIFIED", b)
        state = metrics.EngineState(h.engine.tracked_orders, lambda: 0, types)
        text = generate_latest(metrics.REGISTRY).decode()
        assert 'transition="claim",type="throwaway-7"' in text
        assert {s.labels["type"] for f in state.collect() for s in f.samples if "type" in s.labels} == {
            f"throwaway-{i}" for i in range(200)
        }
        for b in claimed:
            h.engine.observe("DELETED", b)
        await h.engine.follow()
        h.engine.close()
        assert types.live() == {}
        assert "throwaway-" not in generate_latest(metrics.REGISTRY).decode()
        assert not [s for f in state.collect() for s in f.samples if "type" in s.labels]

    run(test)


def test_the_engine_forgets_what_a_fresh_listing_no_longer_has() -> None:
    types = TypeLabels()
    bodies = [initialised(body(i, {"workType": f"gone-{i}"})) for i in range(3)]

    async def test() -> None:
        h = Harness(bodies, types=types)
        h.engine.forget_missing({}, "1000")
        h.engine.close()

    run(test)
    assert types.live() == {}


# --- the secure endpoint: decisions and the cache -----------------------------------------------


class FakeReviews:
    def __init__(self, answers: dict[str, Access | Exception]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, str]] = []

    def review(self, token: str, path: str, verb: str) -> Access:
        self.asked.append((token, path, verb))
        answer = self.answers.get(token, Access(False))
        if isinstance(answer, Exception):
            raise answer
        return answer


READER = Access(True, True, "system:serviceaccount:mon:prometheus")
STRANGER = Access(True, False, "alice", "no RBAC policy matched")


def status_of(guard: AccessCache, header: str) -> int:
    async def ask() -> int:
        refusal = await metrics.authorize(guard, header)
        return 200 if refusal is None else refusal.status

    return asyncio.run(ask())


def test_scrapes_need_a_token_the_api_server_accepts_for_get_metrics() -> None:
    reviews = FakeReviews({"reader": READER, "alice": STRANGER, "down": Transient("no answer"), "bad": Refused("x")})
    guard = AccessCache(reviews)
    assert status_of(guard, "") == 401
    assert status_of(guard, "Basic dXNlcjpwYXNz") == 401
    assert status_of(guard, "Bearer ") == 401
    assert reviews.asked == [], "no token, no review"
    assert status_of(guard, "Bearer forged") == 401
    assert status_of(guard, "Bearer alice") == 403
    assert status_of(guard, "Bearer reader") == 200
    assert status_of(guard, "bearer reader") == 200
    assert ("reader", "/metrics", "get") in reviews.asked
    assert status_of(guard, "Bearer down") == 503
    assert status_of(guard, "Bearer bad") == 500


def test_answers_are_kept_briefly_and_boundedly_and_never_with_the_token() -> None:
    now = [0.0]
    reviews = FakeReviews({"reader": READER, "alice": STRANGER, "down": Transient("no answer")})
    guard = AccessCache(reviews, ttl=60, entries=3, clock=lambda: now[0])

    def check(token: str) -> Access:
        async def ask() -> Access:
            return await guard.check(token)

        return asyncio.run(ask())

    assert check("reader") == READER
    assert check("reader") == READER
    assert check("alice") == STRANGER
    assert [t for t, *_ in reviews.asked] == ["reader", "alice"]
    now[0] = 11  # a refusal is kept at most 10 s, an allowed scrape for the whole ttl
    check("alice")
    check("reader")
    assert [t for t, *_ in reviews.asked] == ["reader", "alice", "alice"]
    now[0] = 61
    check("reader")
    assert [t for t, *_ in reviews.asked].count("reader") == 2
    # Errors are not kept.
    for _ in range(2):
        with pytest.raises(Transient):
            check("down")
    assert [t for t, *_ in reviews.asked].count("down") == 2
    # Bounded: the least recently used go first.
    for i in range(10):
        reviews.answers[f"t{i}"] = READER
        check(f"t{i}")
    assert len(guard) == 3
    kept: Any = guard._answers
    assert all(isinstance(k, bytes) and len(k) == 32 for k in kept), "keys are SHA-256 digests, not tokens"


def test_a_self_signed_certificate_when_no_directory_is_given(tmp_path: Any) -> None:
    context = metrics.tls_context(None)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    cert, key = metrics.self_signed()
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    metrics.tls_context(str(tmp_path))
    assert b"BEGIN CERTIFICATE" in cert and b"PRIVATE KEY" in key
