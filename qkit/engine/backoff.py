"""Retry back-off: exponential with full jitter (docs/semantics.md#retries-and-back-off).

The delay before retry ``n`` (n = the attempt that just failed, from 1) is
uniform in ``[0, min(cap, base * 2**(n-1))]``; base 0 means retry at once.
The jitter is drawn from a hash of (job id, replay epoch, attempt), so the same
batch gives the same delays on every run and a notebook can replay a policy.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts``."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with full jitter, capped."""

    base: float = 2.0
    cap: float = 300.0

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt ``attempt`` (1-based)."""
        if self.base <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(attempt - 1, 60))

    def delay(self, job_id: int, epoch: int, attempt: int) -> float:
        """The delay in seconds before retrying after failed attempt ``attempt``."""
        ceiling = self.ceiling(attempt)
        return 0.0 if ceiling <= 0 else unit_hash("backoff", job_id, epoch, attempt) * ceiling
