"""The retry backoff formula of SPEC.md. Pure."""

from __future__ import annotations

# Whatever the spec says, one retry never waits longer than this.
HARD_CEILING_SECONDS = 7 * 24 * 3600


def retry_delay(backoff_seconds: int, retry_number: int, max_backoff_seconds: int | None = None) -> float:
    """Seconds to wait before retry number `retry_number` (1 for the first retry).

    backoffSeconds * 2^n, capped by maxBackoffSeconds and the 7-day ceiling. The exponent is
    clamped first so a large n cannot build a huge integer.
    """
    cap = min(max_backoff_seconds or HARD_CEILING_SECONDS, HARD_CEILING_SECONDS)
    exponent = min(retry_number, 40)
    return float(min(backoff_seconds * 2**exponent, cap))
