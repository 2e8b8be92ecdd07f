"""Awaiting shard calls: each shard's answer, or why it has none (its state), in bounded time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from service.cluster.runtime import require_ray
from service.cluster.shard import ShardNotReady

# What a shard can be, as the head last saw it. Only "ready" takes writes; reads also try an
# "unresponsive" shard (an answer proves it serves the epoch asked for, see ShardActor).
READY = "ready"
LOADING = "loading"  # being configured and loaded by reload_shard
RESTARTING = "restarting"  # answers, but Ray restarted it (or reset it): needs a reload
STALE = "stale"  # a write failed on it while others applied theirs: needs a reload
DOWN = "down"  # its actor died or cannot be reached
UNRESPONSIVE = "unresponsive"  # no answer within the timeout
SHARD_STATES = (READY, LOADING, RESTARTING, STALE, DOWN, UNRESPONSIVE)

WHY = {
    LOADING: "loading its partition",
    RESTARTING: "restarted and must be reloaded",
    STALE: "missed a write and must be reloaded",
    DOWN: "its actor died or cannot be reached",
    UNRESPONSIVE: "it did not answer in time",
}


@dataclass
class Outcome:
    """Per shard: its result, the state that kept it from answering, or its own error."""

    results: dict[int, Any] = field(default_factory=dict)
    unavailable: dict[int, str] = field(default_factory=dict)  # shard -> state
    errors: dict[int, BaseException] = field(default_factory=dict)  # shard -> its exception
    latency_ms: dict[int, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[int]:
        return sorted({*self.unavailable, *self.errors})


def gather(calls: dict[int, Any], timeout_s: float) -> Outcome:
    """Wait for every shard's object ref at most ``timeout_s`` in all, then sort them out.

    A ref not done by then is "unresponsive" (its call still runs; Ray keeps order, so
    later calls queue behind it). Errors raised inside a shard come back unwrapped from
    Ray's RayTaskError; ShardNotReady among them means "restarting".
    """
    ray = require_ray()
    outcome = Outcome()
    pending = {ref: shard for shard, ref in calls.items()}
    start = time.monotonic()
    while pending:
        left = start + timeout_s - time.monotonic()
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
        if not done:
            break
        for ref in done:
            shard = pending.pop(ref)
            outcome.latency_ms[shard] = (time.monotonic() - start) * 1000.0
            try:
                outcome.results[shard] = ray.get(ref)
            except Exception as exc:  # sorted out just below
                _sort_out(outcome, shard, exc)
    for shard in pending.values():
        outcome.unavailable[shard] = UNRESPONSIVE
    return outcome


def _sort_out(outcome: Outcome, shard: int, exc: Exception) -> None:
    """File a failed call as a shard state (Ray's failures) or the shard's own error."""
    from ray import exceptions

    if isinstance(exc, exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, ShardNotReady):
            outcome.unavailable[shard] = RESTARTING
        elif isinstance(cause, exceptions.RayActorError):
            outcome.unavailable[shard] = DOWN
        elif isinstance(cause, Exception):  # ValueError, TypeError, KeyError, MemoryError
            outcome.errors[shard] = cause
        else:
            outcome.errors[shard] = RuntimeError(str(exc))
    elif isinstance(exc, exceptions.GetTimeoutError):
        outcome.unavailable[shard] = UNRESPONSIVE
    elif isinstance(exc, exceptions.RayError):  # actor died or unavailable, worker lost, ...
        outcome.unavailable[shard] = DOWN
    else:
        outcome.errors[shard] = exc
