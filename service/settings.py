"""All service settings in one pydantic-settings class (env prefix DOTSEARCH_, .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.backend import ClusterOptions
from service.storage import DEFAULT_MEMORY_LIMIT

# The default SQL text bound, also stated in the OpenAPI schema of the SQL routes.
MAX_SQL_CHARS = 1_048_576


class Settings(BaseSettings):
    """Every knob of the service; each field is also `DOTSEARCH_<NAME>` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="DOTSEARCH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    host: str = Field(default="127.0.0.1", description="Interface to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    data_dir: Path = Field(default=Path("./dotsearch-data"), description="DuckDB file and state")
    backend: Literal["auto", "gpu", "cpu", "ray"] = Field(
        default="auto", description="Vector engine: auto | gpu | cpu | ray (sharded on Ray)")
    ray_address: str | None = Field(
        default=None, description="ray backend: a Ray cluster to join (auto, ray://host:10001); "
        "none starts a local Ray")
    shards: int | None = Field(default=None, ge=1, le=256, description="ray backend: shards "
                               "per collection (default: the GPUs Ray sees, or 2)")
    shard_timeout_s: float = Field(default=10.0, gt=0, le=600,
                                   description="ray backend: longest a shard may take to answer")
    shard_check_s: float = Field(default=1.0, gt=0, le=600,
                                 description="ray backend: how often shards are checked")
    weights: str = Field(
        default="auto", description="Featurizer weights: auto | imagenet | random | <path>"
    )
    featurizer_batch: int = Field(default=32, ge=1, le=4096, description="Images per model call")
    load_featurizer: bool = Field(default=True, description="Load Inception-v3 at start")
    batch_window_ms: float = Field(default=1.0, ge=0, le=1000, description="Search batcher window")
    batch_max: int = Field(default=64, ge=1, le=65536, description="Most queries per call")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Per-image byte limit")
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="Per-image pixel limit")
    max_body_bytes: int = Field(default=512 * 1024 * 1024, ge=1, description="Request body limit")
    thumbnail_size: int = Field(default=128, ge=16, le=1024, description="Thumbnail longest side")
    api_key: str | None = Field(default=None, description="Read-write API key (X-API-Key)")
    read_only_api_key: str | None = Field(default=None, description="Read-only API key (X-API-Key)")
    duckdb_memory_limit: str = Field(default=DEFAULT_MEMORY_LIMIT,
                                     description="DuckDB memory_limit")
    sql_timeout_s: float = Field(default=5.0, gt=0, le=3600,
                                 description="Longest a SQL statement or search filter may run")
    sql_max_chars: int = Field(default=MAX_SQL_CHARS, ge=1, le=MAX_SQL_CHARS,
                               description="Longest SQL text (at most the default: lower it)")
    sql_max_tokens: int = Field(default=50_000, ge=1, description="Most SQL tokens in a request")
    sql_max_depth: int = Field(default=200, ge=8, le=900,
                               description="Deepest SQL expression nesting")
    sql_memory_budget: int = Field(default=1 << 30, ge=1 << 20,
                                   description="Process memory (bytes) one statement may add")
    sql_max_result_bytes: int = Field(default=64 << 20, ge=1024,
                                      description="Largest SQL result, in bytes")
    engine_block_bytes: int | None = Field(
        default=None, ge=1, description="Engine block size in bytes (default 256 MiB)")
    engine_block_rows: int | None = Field(
        default=None, ge=1, description="Rows per engine block; overrides engine_block_bytes")
    engine_scratch_bytes: int | None = Field(
        default=None, ge=1, description="Scratch per search in bytes (default 16 MiB on the CPU, "
        "1 GiB on the GPU); lower it after a GPU out-of-memory error")
    header_timeout_s: float = Field(default=10.0, gt=0, le=600,
                                    description="Time a client has to send request headers")
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600,
                                  description="Longest a request body may stall (no bytes)")
    log_level: str = Field(default="info", description="Log level")
    model_max_rows: int = Field(default=1_000_000, ge=2,
                                description="Most training rows one model may read")
    model_max_bytes: int = Field(default=4 << 30, ge=1 << 20,
                                 description="Largest training matrix (rows x dim x 4 bytes)")
    model_max_classes: int = Field(default=1000, ge=2, le=100_000,
                                   description="Most distinct labels one model may have")
    model_max_dim: int = Field(default=65536, ge=1, le=65536,
                               description="Longest vector a model may be trained on")
    model_max_epochs: int = Field(default=1000, ge=1, le=100_000,
                                  description="Most training epochs one model may ask for")
    model_max_count: int = Field(default=1000, ge=1,
                                 description="Most models stored or training at once")
    model_max_training: int = Field(default=2, ge=1, le=64,
                                    description="Most models training at the same time")
    model_train_timeout_s: float = Field(default=3600.0, gt=0, le=86_400,
                                         description="Longest one training may run")
    model_threads: int = Field(default=2, ge=1, le=256,
                               description="torch CPU threads one training or prediction uses")


    def cluster_options(self) -> ClusterOptions:
        """The ray backend's settings."""
        return ClusterOptions(self.ray_address, self.shards, self.shard_timeout_s,
                              self.shard_check_s)

    def engine_options(self) -> dict[str, int | None]:
        """The index constructors' options (None: the engine's default)."""
        return {"block_bytes": self.engine_block_bytes, "block_rows": self.engine_block_rows,
                "scratch_bytes": self.engine_scratch_bytes}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment and .env."""
    return Settings()
