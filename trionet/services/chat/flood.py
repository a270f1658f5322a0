"""Flood control: a token bucket driven by whatever clock the caller reads.

The bucket holds up to ``burst`` tokens and gains ``rate`` tokens per
second; each line costs one. It takes the current time as an argument
instead of reading a clock, so it is pure: the server passes
``trio.current_time()`` (which makes it run on Trio's mock clock in tests)
and unit tests pass plain numbers.
"""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]


class TokenBucket:
    """``burst`` lines at once, refilled at ``rate`` lines per second.

    ``rate=math.inf`` (or ``0``, read as "off") disables the limit.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate >= 0:
            raise ValueError(f"rate must be >= 0 (0 turns flood control off), got {rate}")
        if not burst >= 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = math.inf if rate == 0 else rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def tokens(self, now: float) -> float:
        """Tokens available at time ``now`` (without taking any)."""
        if self.rate == math.inf:
            return self.burst
        elapsed = max(0.0, now - self._stamp)
        return min(self.burst, self._tokens + elapsed * self.rate)

    def take(self, now: float) -> bool:
        """Take one token at time ``now``; ``False`` (nothing taken) when empty."""
        tokens = self.tokens(now)
        # Never move the stamp backwards: a clock that steps back must not
        # mint tokens on the next call.
        self._stamp = max(self._stamp, now)
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        return False
