"""The ray backend's shard watch: a thread that finds shards Ray restarted (empty, not
ready) and streams their partitions back from storage, so they answer again."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.collections import CollectionStore

log = logging.getLogger(__name__)


class ShardWatch:
    """Every ``period_s``: ask each sharded index which shards restarted, reload those.
    Searches on a collection with a shard down answer 503 until its reload ends."""

    def __init__(self, store: CollectionStore, period_s: float) -> None:
        self._store = store
        self._period_s = period_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dotsearch-shard-watch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def check_now(self) -> int:
        """One round: reload every shard that needs it; how many were reloaded."""
        reloaded = 0
        for name, shard in self._store.stale_shards():
            if self._stopped.is_set():
                break
            rows = self._store.reload_shard(name, shard)
            log.warning("shard %d of %s was restarted: reloaded %d rows from storage",
                        shard, name, rows)
            reloaded += 1
        return reloaded

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            try:
                self.check_now()
            except Exception:  # a shard may fail again mid-reload: the next round retries
                log.exception("shard check failed; retrying in %.1f s", self._period_s)
