"""The agent SDK's handling of a lost reply, against the in-memory store (the API server's
compare-and-swap rules; no network)."""

from __future__ import annotations

from typing import Any

import pytest
import urllib3

from tests.unit.orders import AGENT_A, AGENT_B, NOW, MemoryOrders, order_body, read, store
from workorder_operator import lifecycle as lc
from workorder_operator.agent import Agent
from workorder_operator.lifecycle import StatusWrite
from workorder_operator.model import WorkOrder
from workorder_operator.targeting import AgentIdentity


class LostReplies(MemoryOrders):
    """The write reaches the API server and takes effect; its reply never comes back."""

    def write_status(self, order: WorkOrder, write: StatusWrite, budget: float | None = None) -> dict[str, Any]:
        super().write_status(order, write, budget)
        raise urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")  # type: ignore[arg-type]


def agent_on(orders: MemoryOrders, agent_id: str = AGENT_A) -> Agent:
    agent = Agent(None, agent_id)  # type: ignore[arg-type]
    agent.orders = orders  # type: ignore[assignment]
    agent._user = ""  # no identity lookup
    return agent


def pending() -> dict[str, Any]:
    body = order_body()
    return store(body, lc.initialise(read(body), NOW))


def test_a_claim_whose_reply_was_lost_is_adopted_when_the_order_holds_it() -> None:
    db = LostReplies([pending()])
    claim = agent_on(db).claim(read(pending()))
    assert claim is not None, "the claim took effect but the agent did not adopt it"
    assert claim.attempt == 1 and claim.order.status.claimed_by == AGENT_A
    assert db.done == [("claim", claim.order.uid)]


def test_a_lost_reply_is_not_adopted_when_another_agent_holds_the_order() -> None:
    body = pending()
    db = MemoryOrders([body])
    # Agent B's claim lands; agent A's request, sent from the same stale view, is refused by the
    # server (its guards fail), but the reply of that refusal is lost too.
    b_claim = lc.claim(read(body), AgentIdentity(AGENT_B), NOW)
    db.bodies[("team-a", "wo-1")] = store(body, b_claim)

    class Refused(MemoryOrders):
        def write_status(self, order: WorkOrder, write: StatusWrite, budget: float | None = None) -> dict[str, Any]:
            raise urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")  # type: ignore[arg-type]

    refused = Refused(list(db.bodies.values()))
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        agent_on(refused).claim(read(body))
