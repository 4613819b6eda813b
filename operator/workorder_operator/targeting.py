"""Which agent may claim which order (SPEC.md, Targeting). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from workorder_operator.model import Targeting


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
