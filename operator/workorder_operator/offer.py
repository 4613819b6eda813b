"""The Pending orders an agent could take, in offer order, without their content. Pure: no I/O.

An agent watching 100,000 Pending orders must not hold 100,000 parsed WorkOrders with their
yamlContent (1.8 GB). It keeps a `Candidate` per order it would take instead: the sort key, what
dividing the queue needs (`fleet.Facts`), and the order with its content removed as compact JSON,
compressed with a preset dictionary of what a Pending order's status looks like (the conditions
and their messages are the same in every order: 930 bytes become about 150), parsed into a
WorkOrder only for the few candidates a claim round tries. The claim's reply (the whole object) is
what a handler gets, content included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedKeyList

from workorder_operator import lifecycle
from workorder_operator.fleet import Facts
from workorder_operator.model import Spec, WorkOrder, format_time, order_body
from workorder_operator.targeting import AgentIdentity

# The spec fields that are the work itself, not needed to choose or claim an order (model.Spec).
CONTENT_FIELDS = frozenset({"yamlContent"})
# Spec fields kept: those the model knows (the rest it ignores anyway), less the content.
_SPEC_FIELDS = frozenset(f.alias or name for name, f in Spec.model_fields.items()) - CONTENT_FIELDS
# What WorkOrder.from_body reads of the metadata (managedFields only tells the operator's timing).
_META_FIELDS = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp")

SortKey = tuple[int, dt.datetime, str]


def _compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def sort_key(order: WorkOrder) -> SortKey:
    """The offer order: priority high first, then oldest first (namespace/name breaks ties)."""
    return (-order.spec.priority, order.created_at, order.key)


def without_content(body: dict[str, Any]) -> dict[str, Any]:
    """The order as the API sent it, less its content (and metadata no claim needs)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    return {
        "metadata": {k: meta[k] for k in _META_FIELDS if k in meta},
        "spec": {k: v for k, v in spec.items() if k in _SPEC_FIELDS},
        "status": body.get("status") or {},
    }


@dataclass(frozen=True, slots=True, eq=False)
class Candidate:
    """One order an agent would take, as small as it can be kept (see the module docstring)."""

    key: str
    resource_version: str
    sort_key: SortKey
    facts: Facts
    # without_content(body), compact JSON, compressed with DICTIONARY.
    body: bytes

    def stored(self) -> dict[str, Any]:
        """The order as the API sent it, less its content."""
        unzip = zlib.decompressobj(zdict=DICTIONARY)
        body: dict[str, Any] = json.loads(unzip.decompress(self.body) + unzip.flush())
        return body

    def order(self) -> WorkOrder:
        """The order, parsed (its yamlContent empty): enough to build the claim write."""
        body = self.stored()
        body["spec"]["yamlContent"] = ""
        return WorkOrder.from_body(body)


def candidate(body: dict[str, Any], takes: Callable[[WorkOrder], bool]) -> Candidate | None:
    """The candidate for an order's body, or None when `takes` refuses it. An unreadable body
    raises what WorkOrder.from_body raises (KeyError, ValueError, TypeError)."""
    small = without_content(body)
    spec = small["spec"]
    # The model wants yamlContent; the empty string stands in for it (and is not kept).
    order = WorkOrder.from_body({**small, "spec": {**spec, "yamlContent": ""}})
    if not takes(order):
        return None
    facts = Facts.of(order)
    # Many orders share a namespace and a work type: one string each, not one per order.
    facts = dataclasses.replace(facts, namespace=sys.intern(facts.namespace), work_type=sys.intern(facts.work_type))
    zip_ = zlib.compressobj(1, zdict=DICTIONARY)
    return Candidate(
        key=order.key,
        resource_version=order.resource_version,
        sort_key=sort_key(order),
        facts=facts,
        body=zip_.compress(_compact(small)) + zip_.flush(),
    )


class Offer:
    """Candidates by key, iterated in offer order. Not thread-safe: the owner locks."""

    def __init__(self) -> None:
        self._by_key: dict[str, Candidate] = {}
        self._sorted: SortedKeyList[Candidate, SortKey] = SortedKeyList(key=lambda c: c.sort_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._sorted)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def get(self, key: str) -> Candidate | None:
        return self._by_key.get(key)

    def put(self, c: Candidate) -> None:
        """Add or replace (by key) a candidate."""
        self.remove(c.key)
        self._by_key[c.key] = c
        self._sorted.add(c)

    def remove(self, key: str) -> bool:
        """Forget the order, whatever its version; whether it was there."""
        old = self._by_key.pop(key, None)
        if old is None:
            return False
        self._sorted.remove(old)
        return True

    def discard(self, key: str, resource_version: str) -> bool:
        """Forget this version of an order (a newer one stays); whether it was there."""
        held = self._by_key.get(key)
        if held is None or held.resource_version != resource_version:
            return False
        return self.remove(key)

    def keys(self) -> set[str]:
        return set(self._by_key)


# The preset zlib dictionary: a Pending order as a released claim leaves it, and as the operator
# leaves it new (zlib prefers what is nearest the end: the most common form last). Made by
# `lifecycle`, so it says what the orders say; made here, not in a function, because it is a
# tuning constant, not behaviour (any dictionary gives back what was put in; mutation testing
# mutates functions only).
_AT = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_AGENT = AgentIdentity(str(uuid.UUID(int=1)))
_SAMPLE = order_body("name", namespace="namespace", workType="type", yamlContent="", maxRetries=3, backoffSeconds=60,
                     claimTimeoutSeconds=3600, priority=0)  # fmt: skip
_SAMPLE["metadata"].update(uid=str(uuid.UUID(int=0)), resourceVersion="1", generation=1,
                           creationTimestamp=format_time(_AT))  # fmt: skip
_NEW = {**_SAMPLE, "status": lifecycle.initialise(WorkOrder.from_body(_SAMPLE), _AT).status}
_CLAIMED = {**_NEW, "status": lifecycle.claim(WorkOrder.from_body(_NEW), _AGENT, _AT, "user").status}
_RELEASED = {**_CLAIMED, "status": lifecycle.release(WorkOrder.from_body(_CLAIMED), _AGENT.id, 1, _AT, "x").status}
DICTIONARY = _compact(without_content(_RELEASED)) + _compact(without_content(_NEW))
