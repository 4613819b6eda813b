"""Which agent may claim which order (SPEC.md, Targeting). Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from workorder_operator.model import Targeting

# What the API server's `format: uuid` accepts (targeting.agentIds): 8-4-4-4-12 or 32 hex digits.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}", re.IGNORECASE)


def check_agent_id(value: object, field: str = "agent id") -> str:
    """`value` if it is a UUID, else ValueError naming `field`: an agent with another id could
    never be targeted, and a long one is refused only when it writes, naming whatever order it
    tried to claim."""
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise ValueError(
            f"{field} {value!r} is not a UUID (agent ids are UUIDs, e.g. 6f1c2a4e-8d3b-4f7a-9e21-5c0b7d9a1e34; "
            "uuidgen or cat /proc/sys/kernel/random/uuid makes one)"
        )
    return value


@dataclass(frozen=True)
class AgentIdentity:
    """Who an agent is, as targeting sees it."""

    id: str
    labels: Sequence[str] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)


def admits(targeting: Targeting | None, agent: AgentIdentity) -> bool:
    """No targeting admits everyone; otherwise any match admits (OR, exact string match):
    the agent's id is listed, it shares a label, or it has one of the annotations with the same value."""
    if targeting is None or not (targeting.agent_ids or targeting.labels or targeting.annotations):
        return True
    if agent.id in targeting.agent_ids:
        return True
    if set(agent.labels) & set(targeting.labels):
        return True
    return any(agent.annotations.get(k) == v for k, v in targeting.annotations.items())
