"""The catalog the service uses: the collection store with its SQL face (queries, filters)
and its trained models."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from service.auth import Access
from service.catalog_values import Hit, QueryResult
from service.collections import AllowFn, CollectionStore
from service.limits import SqlLimits
from service.models import ModelLimits, ModelRegistry
from service.settings import Settings
from service.sql.executor import execute_script
from service.sql.filters import filter_ids
from service.sql.functions import register_functions
from service.sql.predict import register_model_functions


class Catalog(CollectionStore):
    """Collections plus SQL: ``query`` runs scripts, ``search`` takes a SQL ``filter``.

    The store beneath imports nothing from ``service.sql``; this layer joins the two.
    """

    def __init__(self, *args: Any, model_limits: ModelLimits | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            # Models train and predict on the engine's device: the GPU under the gpu backend.
            self.models = ModelRegistry(self._storage, self.write_order, model_limits,
                                        device="cuda" if self.backend_name == "gpu" else "cpu")
            self.models.load()
            self.on_storage_open(register_functions)
            self.on_storage_open(lambda con: register_model_functions(con, self.models))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        """The catalog of ``settings.data_dir`` with every engine and SQL setting applied."""
        return cls(settings.data_dir, settings.backend,
                   duckdb_memory_limit=settings.duckdb_memory_limit,
                   sql_limits=SqlLimits.from_settings(settings),
                   engine_options=settings.engine_options(),
                   cluster=settings.cluster_options(),
                   model_limits=ModelLimits.from_settings(settings))

    def close(self) -> None:
        models: ModelRegistry | None = getattr(self, "models", None)
        if models is not None:
            models.close()  # trainings stop before storage closes
        super().close()

    def query(self, sql: str, params: dict[str, Any] | list[Any] | None = None, *,
              access: Access = "write") -> QueryResult:
        """Run a SQL script (statements separated by ';'); the last statement's result.

        ``access="read"`` (the read-only key) refuses the script, before any statement
        runs, unless every parsed statement only reads.
        """
        return execute_script(self, sql, params, access=access)

    def search(self, name: str, queries: Any, k: int, *, threshold: float | None = None,
               offset: int = 0, allow: AllowFn | None = None, filter: str | None = None
               ) -> list[list[Hit]]:
        """Top-k per query; ``filter``, a SQL boolean expression over metadata, pre-filters
        exactly (it runs in the search's snapshot, under the SQL limits)."""
        if filter is not None and str(filter).strip():
            text = str(filter)

            def allowed() -> npt.NDArray[np.int64]:
                return filter_ids(self, self.collection(name).record, text)

            allow = allowed
        return super().search(name, queries, k, threshold=threshold, offset=offset,
                              allow=allow)
