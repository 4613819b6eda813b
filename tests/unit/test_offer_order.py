"""The order in which an agent is offered Pending orders (SPEC.md): priority high first, then
oldest first; the name breaks a tie of equal creation seconds (creationTimestamp has a
resolution of one second), so every agent sees the same order whatever order it learnt them in."""

from __future__ import annotations

import datetime as dt

from tests.unit.orders import CREATED, make_order
from workorder_operator.agent import order_sort_key


def test_priority_then_age_then_name() -> None:
    later = CREATED + dt.timedelta(seconds=1)
    orders = [
        make_order({"priority": 0}, name="a-new", created=later),
        make_order({"priority": 7}, name="y-high", created=later),
        make_order({"priority": 7}, name="b-high", created=later),
        make_order({"priority": -1}, name="a-low", created=CREATED),
        make_order({"priority": 0}, name="z-old", created=CREATED),
    ]
    offered = [o.name for o in sorted(orders, key=order_sort_key)]
    assert offered == ["b-high", "y-high", "z-old", "a-new", "a-low"]
    # Learnt in any other order (a watch delivers them as they come), the offer is the same.
    assert [o.name for o in sorted(reversed(orders), key=order_sort_key)] == offered
