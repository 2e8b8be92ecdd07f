"""Trained models: classifiers trained in torch on stored vectors, kept durably in DuckDB,
served over REST, in SQL (PREDICT, PREDICT_PROBA) and from the CLI."""

from service.models.registry import (
    ModelInfo,
    ModelLimits,
    ModelNotReady,
    ModelRegistry,
    label_text,
)
from service.models.training import KINDS, TrainOptions

__all__ = ["KINDS", "ModelInfo", "ModelLimits", "ModelNotReady", "ModelRegistry",
           "TrainOptions", "label_text"]
