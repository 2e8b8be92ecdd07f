"""ShardedIndex: one VectorIndex over Ray actors, ids hashed to shards, answers merged exactly."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback.core import (
    ENGINE_OPTIONS,
    STORAGE_NUMPY,
    FloatArray,
    IdArray,
    IndexUnavailable,
    Scoring,
    VectorIndex,
    as_ids,
    as_matrix,
    as_stored,
    check_config,
    check_k,
    check_size,
    check_threshold,
    merge_range_results,
    merge_search_results,
    normalise_rows,
    prepare_batch,
)
from service.cluster.actors import START_TIMEOUT_S, ShardActors, start_shard_actors
from service.cluster.calls import (
    DOWN,
    LOADING,
    READY,
    RESTARTING,
    STALE,
    UNRESPONSIVE,
    WHY,
    Outcome,
    gather,
)
from service.cluster.routing import shard_of_ids, split_by_owner
from service.cluster.runtime import default_shards, ensure_ray, require_ray
from service.cluster.shard import ShardActor


@dataclass
class _Shard:
    """The head's view of one shard: its actor, the epoch and incarnation it serves."""

    index: int
    handle: Any
    epoch: int = 1
    incarnation: str = ""
    state: str = LOADING
    rows: int = 0  # what the shard holds (exact: counted from add/remove/finish)
    node: str = ""
    device: str = ""
    last_latency_ms: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)

    def learn(self, status: dict[str, Any]) -> None:
        self.node, self.device, self.memory = status["node"], status["device"], status["memory"]


class ShardedIndex(VectorIndex):
    """Exact index whose rows live on Ray actors (``ShardActor``), one partition each.

    Ids go to shards by ``shard_of`` (a stable hash). A write goes only to the owning
    shards; a search ships the query batch once (``ray.put``) to every shard with an
    allowed id and merges the per-shard answers by score, then id, so the answer equals one
    index's. A shard that is down, restarting, reloading or slower than ``timeout_s`` makes
    the call raise ``IndexUnavailable``: never a partial answer. ``refresh`` finds shards
    that need their partition again and ``reload_shard`` streams it back from the caller's
    storage (the system of record). ``actors``: existing handles to reuse (a test pool; not
    killed on close); ``actor_class``/``actor_options``: what and how to start.
    """

    backend = "ray"

    def __init__(
        self, dim: int, metric: str = "cosine", dtype: str = "float32", *,
        shards: int | None = None, timeout_s: float = 10.0, name: str = "",
        actors: list[Any] | None = None, actor_options: dict[str, Any] | None = None,
        actor_class: type = ShardActor, block_bytes: int | None = None,
        block_rows: int | None = None, scratch_bytes: int | None = None,
    ) -> None:
        check_config(dim, metric, dtype)
        self.dim, self.metric, self.dtype = int(dim), metric, dtype
        self.engine_options = dict(zip(ENGINE_OPTIONS, (block_bytes, block_rows, scratch_bytes),
                                       strict=True))
        for option, value in self.engine_options.items():
            check_size(option, value, 1)
        if shards is not None:
            check_size("shards", shards, 1)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.timeout_s, self.name = float(timeout_s), name
        self._storage = STORAGE_NUMPY[dtype]
        self._scoring = Scoring(metric)
        if actors is not None:
            if shards is not None and shards != len(actors):
                raise ValueError(f"shards={shards} but {len(actors)} actors were given")
            self._owned: ShardActors | None = None
            handles = list(actors)
        else:
            ensure_ray()
            self._owned = start_shard_actors(shards or default_shards(), actor_class=actor_class,
                                             actor_options=actor_options)
            handles = self._owned.handles
        self._shards = [_Shard(i, handle) for i, handle in enumerate(handles)]
        try:
            self._configure(list(range(len(handles))), START_TIMEOUT_S)
            self._run({s.index: s.handle.finish.remote(s.epoch) for s in self._shards},
                      START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        for shard in self._shards:
            shard.state = READY

    # ------------------------------------------------------------------ routing
    @property
    def shards(self) -> int:
        return len(self._shards)

    @property
    def handles(self) -> list[Any]:
        """The shards' actor handles, in shard order."""
        return [shard.handle for shard in self._shards]

    def shards_touched(self, allow: npt.ArrayLike | None = None) -> tuple[int, int]:
        """A search asks every shard, or under an allow-list only the shards owning an id."""
        total = len(self._shards)
        if allow is None:
            return total, total
        return len(np.unique(self.shard_of(allow))), total

    def shard_of(self, ids: npt.ArrayLike) -> IdArray:
        """The shard holding each id (int64 (n,) -> int64 (n,))."""
        return shard_of_ids(ids, len(self._shards))

    # ------------------------------------------------------------------ writes
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike, *, prepared: bool = False
            ) -> None:
        """Upsert; checked once here, then each owning shard stores its rows as given."""
        if prepared:  # the storage cast is the one check left; made here, before any shard
            id_array = np.asarray(ids, dtype=np.int64)
            rows = as_stored(np.asarray(vectors, dtype=np.float32), self._storage)
        else:
            id_array, rows = prepare_batch(ids, vectors, self.dim, self.metric, self._storage)
        owners = split_by_owner(self.shard_of(id_array))
        calls = {i: (id_array[at], rows[at]) for i, at in owners.items()}
        for i, held in self._fan_out("add", calls, write=True).items():
            self._shards[i].rows = held

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ids from their owning shards; returns how many were present."""
        id_array = np.unique(as_ids(ids, allow_empty=True))
        calls = {i: (id_array[at],) for i, at in split_by_owner(self.shard_of(id_array)).items()}
        removed = 0
        for i, (gone, held) in self._fan_out("remove", calls, write=True).items():
            self._shards[i].rows = held
            removed += gone
        return removed

    # ------------------------------------------------------------------ reads
    def search(self, queries: npt.ArrayLike, k: int, threshold: float | None = None,
               allow: npt.ArrayLike | None = None) -> tuple[FloatArray, IdArray]:
        """Top-k over every shard: (q, dim) -> scores float32 (q, k), ids int64 (q, k)."""
        matrix = self._checked_queries(queries)
        k, limit = check_k(k), check_threshold(threshold)
        targets = self._targets(allow)
        self._require(targets)  # before the batch is put in the object store
        if k == 0 or not targets:
            return (np.full((len(matrix), k), self._scoring.missing, np.float32),
                    np.full((len(matrix), k), -1, np.int64))
        batch = require_ray().put(matrix)  # one copy in the object store, read by every shard
        calls = {i: (batch, k, limit, part) for i, part in targets.items()}
        parts = self._fan_out("search", calls)
        return merge_search_results([parts[i] for i in sorted(parts)], k, self.metric)

    def range_search(self, queries: npt.ArrayLike, threshold: float,
                     allow: npt.ArrayLike | None = None, max_results: int | None = None
                     ) -> tuple[IdArray, FloatArray, IdArray, IdArray]:
        """Every row at least as close as threshold, over every shard, FAISS style."""
        matrix = self._checked_queries(queries)
        limit = check_threshold(threshold)
        if limit is None:
            raise ValueError("range_search needs a threshold")
        cap = None if max_results is None else check_k(max_results)
        targets = self._targets(allow)
        self._require(targets)
        if not targets:
            return self._scoring.ranges_from_hits([], len(matrix), cap)
        batch = require_ray().put(matrix)
        calls = {i: (batch, limit, part, cap) for i, part in targets.items()}
        parts = self._fan_out("range_search", calls)
        return merge_range_results([parts[i] for i in sorted(parts)], self.metric, cap)

    def get(self, ids: npt.ArrayLike) -> FloatArray:
        """Stored vectors for ids, from their shards; KeyError if one is absent."""
        id_array = as_ids(ids, allow_empty=True)
        out = np.empty((len(id_array), self.dim), np.float32)
        groups = split_by_owner(self.shard_of(id_array))
        found = self._fan_out("get", {i: (id_array[at],) for i, at in groups.items()})
        for i, at in groups.items():
            out[at] = found[i]
        return out

    def __len__(self) -> int:
        return sum(shard.rows for shard in self._shards)

    def __contains__(self, id_: object) -> bool:
        if not isinstance(id_, int | np.integer) or not 0 <= int(id_) <= np.iinfo(np.int64).max:
            return False
        owner = int(self.shard_of([int(id_)])[0])
        return bool(self._fan_out("contains", {owner: ([int(id_)],)})[owner][0])

    def holds_any(self, ids: npt.ArrayLike) -> bool:
        """One call per owning shard for the whole batch (not one per id)."""
        id_array = as_ids(ids, allow_empty=True)
        groups = split_by_owner(self.shard_of(id_array))
        found = self._fan_out("contains", {i: (id_array[at],) for i, at in groups.items()})
        return any(bool(np.any(held)) for held in found.values())

    def memory_info(self) -> dict[str, Any]:
        """Sums over the shards (after polling them), and each shard's own figures."""
        self.refresh()
        memories = [shard.memory for shard in self._shards]
        first = memories[0]
        return {
            "backend": self.backend,
            "device": f"{len(self._shards)} shards on "
                      + ", ".join(sorted({s.device for s in self._shards if s.device})),
            "vectors": len(self),
            **{key: sum(int(m.get(key, 0)) for m in memories)
               for key in ("capacity_rows", "vector_bytes", "allocated_bytes")},
            "block_rows": first.get("block_rows"),
            "scratch_budget_bytes": first.get("scratch_budget_bytes"),
            "shard_backend": first.get("backend"),
            "shards": [{**shard.memory, **state}
                       for state, shard in zip(self.shard_states(), self._shards, strict=True)],
        }

    # ------------------------------------------------------------------ shards
    def check_ready(self) -> None:
        for shard in self._shards:
            if shard.state != READY:
                raise IndexUnavailable(self._why(shard.index, shard.state))

    def shard_states(self) -> list[dict[str, Any]]:
        """What the head last saw of each shard (no remote call: cheap enough for metrics)."""
        return [{"index": s.index, "state": s.state, "node": s.node, "device": s.device,
                 "rows": s.rows, "bytes": int(s.memory.get("allocated_bytes", 0)),
                 "epoch": s.epoch, "last_latency_ms": s.last_latency_ms}
                for s in self._shards]

    def refresh(self, timeout_s: float | None = None) -> list[int]:
        """Poll every shard's status (``timeout_s`` in all); the shards that need a reload.

        A shard with another incarnation (Ray restarted it), or not ready at the epoch the
        head expects, is "restarting" (or stays "stale"); one that answers normally after
        "unresponsive" or "down" is "ready" again.
        """
        outcome = gather({s.index: s.handle.status.remote() for s in self._shards},
                         timeout_s or self.timeout_s)
        self._note(outcome)
        for i, state in outcome.unavailable.items():
            self._shards[i].state = state
        for i, status in outcome.results.items():
            shard = self._shards[i]
            shard.learn(status)
            serving = (status["incarnation"] == shard.incarnation and status["ready"]
                       and status["epoch"] == shard.epoch)
            if serving:  # never so for a stale shard: its epoch moved on
                shard.state, shard.rows = READY, int(status["rows"])
            elif shard.state not in (STALE, LOADING):  # a reload in progress stays loading
                shard.state = RESTARTING
        return [s.index for s in self._shards if s.state in (RESTARTING, STALE, LOADING)]

    def reload_shard(self, shard: int,
                     chunks: Iterable[tuple[npt.ArrayLike, npt.ArrayLike]]) -> int:
        """Rebuild shard ``shard`` from chunks of every row (its own are picked out and sent
        one chunk at a time); it is ready again when this returns the rows loaded."""
        if not 0 <= shard < len(self._shards):
            raise ValueError(f"shard must be in 0..{len(self._shards) - 1}, got {shard}")
        head = self._shards[shard]
        head.state, head.epoch = LOADING, head.epoch + 1  # what it holds is refused from now
        self._configure([shard], self.timeout_s)
        in_flight: list[Any] = []  # at most two chunks on their way: bounded memory
        for ids, vectors in chunks:
            id_array = as_ids(ids, allow_empty=True)
            mine = self.shard_of(id_array) == shard
            if not mine.any():
                continue
            part_ids, rows = prepare_batch(id_array[mine], np.asarray(vectors)[mine],
                                           self.dim, self.metric, self._storage)
            in_flight.append(head.handle.load.remote(head.epoch, part_ids, rows))
            if len(in_flight) == 2:
                self._run({shard: in_flight.pop(0)}, self.timeout_s)
        for ref in in_flight:
            self._run({shard: ref}, self.timeout_s)
        head.rows = self._run({shard: head.handle.finish.remote(head.epoch)},
                              self.timeout_s)[shard]
        head.state = READY
        return head.rows

    def close(self) -> None:
        """Kill the actors this index started (not those it was given)."""
        if self._owned is not None:
            self._owned.kill()
            self._owned = None
            for shard in self._shards:
                shard.state = DOWN

    # ------------------------------------------------------------------ internals
    def _checked_queries(self, queries: npt.ArrayLike) -> FloatArray:
        """Queries checked here (so bad input fails before any shard is asked) and sent as
        given: each shard normalises them once, as a single index would."""
        matrix = as_matrix(queries, self.dim, "queries")
        if self.metric == "cosine":
            normalise_rows(matrix, "queries")  # a zero query is refused here
        return matrix

    def _targets(self, allow: npt.ArrayLike | None) -> dict[int, IdArray | None]:
        """The shards to ask and the allow-list part each gets (None: no allow-list)."""
        if allow is None:
            return dict.fromkeys(range(len(self._shards)))
        allowed = np.unique(as_ids(allow, allow_empty=True))
        return {i: allowed[at] for i, at in split_by_owner(self.shard_of(allowed)).items()}

    def _configure(self, shards: list[int], timeout_s: float) -> None:
        calls = {i: self._shards[i].handle.configure.remote(
            self.dim, self.metric, self.dtype, self._shards[i].epoch, self.engine_options)
            for i in shards}
        for i, status in self._run(calls, timeout_s).items():
            self._shards[i].incarnation = status["incarnation"]
            self._shards[i].learn(status)

    def _require(self, shards: Iterable[int], *, write: bool = False) -> None:
        """IndexUnavailable unless each shard may be asked: writes need it ready (as last
        seen); reads also try an unresponsive one (an answer shows it serves again)."""
        usable = (READY,) if write else (READY, UNRESPONSIVE)
        for i in sorted(shards):
            if self._shards[i].state not in usable:
                raise IndexUnavailable(self._why(i, self._shards[i].state))

    def _fan_out(self, method: str, args: dict[int, tuple[Any, ...]], *, write: bool = False
                 ) -> dict[int, Any]:
        """Call ``method`` on each listed shard with its epoch and args, all at once; every
        answer, or IndexUnavailable, or the first shard's own error."""
        self._require(args, write=write)
        epochs = {i: self._shards[i].epoch for i in args}
        calls = {i: getattr(self._shards[i].handle, method).remote(epochs[i], *a)
                 for i, a in args.items()}
        outcome = gather(calls, self.timeout_s)
        if write and outcome.failed and (outcome.results or outcome.unavailable):
            self._write_failed(outcome)
        return self._settle(outcome, epochs)

    def _run(self, calls: dict[int, Any], timeout_s: float) -> dict[int, Any]:
        """Await lifecycle calls (configure, load, finish): answers, or the error."""
        return self._settle(gather(calls, timeout_s),
                            {i: self._shards[i].epoch for i in calls})

    def _settle(self, outcome: Outcome, epochs: dict[int, int]) -> dict[int, Any]:
        """Record what the outcome says of each shard; its results, or the first failure.

        A failure is recorded only while the shard is still at the epoch the call named: a
        search that raced a reload must not mark the reloaded shard restarting."""
        self._note(outcome)
        for i, state in outcome.unavailable.items():
            if self._shards[i].epoch == epochs[i] and self._shards[i].state != STALE:
                self._shards[i].state = state
        for i in outcome.results:
            if self._shards[i].state == UNRESPONSIVE:  # it answered at its epoch: serving
                self._shards[i].state = READY
        if outcome.unavailable:
            first = min(outcome.unavailable)
            state = outcome.unavailable[first]
            raise IndexUnavailable(self._why(first, state))
        if outcome.errors:  # the shard's own error (bad input, KeyError, MemoryError)
            raise outcome.errors[min(outcome.errors)]
        return outcome.results

    def _write_failed(self, outcome: Outcome) -> None:
        """Some shards applied a write and the failed ones may or may not have: those are
        stale until reloaded (their epoch moves on, so they refuse every call meanwhile)."""
        self._note(outcome)
        for i in outcome.failed:
            self._shards[i].epoch += 1
            state = outcome.unavailable.get(i, STALE)
            self._shards[i].state = state if state in (DOWN, RESTARTING) else STALE
        first = outcome.failed[0]
        applied = sorted(outcome.results)
        raise IndexUnavailable(
            f"{self._why(first, self._shards[first].state)}; the write reached shards "
            f"{applied or 'none'} and must reach shards {outcome.failed} by a reload")

    def _note(self, outcome: Outcome) -> None:
        for i, latency in outcome.latency_ms.items():
            self._shards[i].last_latency_ms = latency

    def _why(self, shard: int, state: str) -> str:
        return (f"shard {shard} of {self.name!r} is {state} ({WHY.get(state, state)}); "
                "its collection answers again once it is back")
