"""Routing: the structural model of a route that the alert lifecycle needs.

A route is an ordered list of escalation tiers followed by a mandatory failsafe. The
protocol YAML (``alerts/protocol.py``) owns the real definitions; this module does not
import it. Its routes are adapted with::

    RouteSpec.model_validate(protocol_route.model_dump())

Unknown extra fields are ignored so the protocol model may carry more than we need.

Timeout semantics (``TierSpec.escalate_after_minutes``), per severity:

* a number: escalate to the next tier (or the failsafe after the last tier) when the alert
  is still unacknowledged that many minutes after entering this tier;
* explicit ``None``: no automatic escalation from this tier at this severity;
* severity missing from the dict: fall back to the nearest *more urgent* severity that
  is present (fail safe: a missing entry never means "slower" than a more urgent one);
  if none is present, no automatic escalation.

Info-severity alerts never page and never escalate (see ``alerts/lifecycle.py``).

The route is copied onto the alert when it opens (:func:`copy_route`): a later change of
the protocol does not reroute an open alert.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.findings import SEVERITY_ORDER, Severity

__all__ = ["TierSpec", "FailsafeSpec", "RouteSpec", "copy_route", "route_from_alert", "FALLBACK_ROUTE"]

_URGENCY_ORDER = SEVERITY_ORDER


class _Spec(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TierSpec(_Spec):
    name: str = Field(min_length=1)
    recipients: list[str] = Field(min_length=1)
    escalate_after_minutes: dict[Severity, float | None] = Field(default_factory=dict)

    @field_validator("escalate_after_minutes")
    @classmethod
    def _non_negative(cls, v: dict[Severity, float | None]) -> dict[Severity, float | None]:
        for sev, minutes in v.items():
            if minutes is not None and minutes < 0:
                raise ValueError(f"escalate_after_minutes[{sev}] must be >= 0")
        return v

    def timeout_minutes(self, severity: Severity) -> float | None:
        """Minutes before escalating out of this tier at ``severity`` (None: never)."""
        if severity in self.escalate_after_minutes:
            return self.escalate_after_minutes[severity]
        for more_urgent in _URGENCY_ORDER[_URGENCY_ORDER.index(severity) + 1:]:
            if more_urgent in self.escalate_after_minutes:
                return self.escalate_after_minutes[more_urgent]
        return None


class FailsafeSpec(_Spec):
    """The last resort every route ends in (e.g. the site's 24/7 clinical coordinator)."""

    name: str = Field(min_length=1)
    recipients: list[str] = Field(min_length=1)


class RouteSpec(_Spec):
    id: str = Field(min_length=1)
    tiers: list[TierSpec] = Field(min_length=1)
    #: mandatory: a route without a failsafe fails validation
    failsafe: FailsafeSpec

    @property
    def last_index(self) -> int:
        """Escalation index of the failsafe (tiers are 0..len(tiers)-1)."""
        return len(self.tiers)

    def level_name(self, index: int) -> str:
        return self.tiers[index].name if index < len(self.tiers) else self.failsafe.name

    def recipients(self, index: int) -> list[str]:
        return list(self.tiers[index].recipients if index < len(self.tiers) else self.failsafe.recipients)

    def timeout_minutes(self, index: int, severity: Severity) -> float | None:
        """Timeout of escalation level ``index``; the failsafe never escalates further."""
        if index >= len(self.tiers):
            return None
        return self.tiers[index].timeout_minutes(severity)


def copy_route(route: RouteSpec) -> dict[str, Any]:
    """A deep, JSON-ready copy of ``route`` to store on an alert at open time."""
    return route.model_dump(mode="json")


def route_from_alert(route: dict[str, Any]) -> RouteSpec:
    """Rebuild the route copied onto an alert."""
    return RouteSpec.model_validate(route)


#: used when a finding names no route, or a route the configuration does not know, and no
#: default route is configured: an alert is never dropped for want of routing.
FALLBACK_ROUTE = RouteSpec(
    id="fallback",
    tiers=[
        TierSpec(
            name="care-team",
            recipients=["care-team"],
            escalate_after_minutes={Severity.CRITICAL: 5, Severity.HIGH: 15, Severity.WARNING: 60},
        )
    ],
    failsafe=FailsafeSpec(name="failsafe", recipients=["clinical-coordinator"]),
)
