"""Training on a collection (the REST and CLI use case): its vectors, a label column, the
rows a filter admits, read like any query, then trained in the background."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlglot import exp

from service.errors import InvalidInput
from service.models.registry import ModelInfo
from service.sql.dialect import parse_condition
from service.sql.models import training_data
from service.sql.predict import registry_of
from service.sql.vectors import Session

if TYPE_CHECKING:
    from service.catalog import Catalog


def training_query(vector_column: str, label_column: str, collection: str,
                   filter: str | None) -> exp.Select:
    """SELECT <vector>, <label> FROM <collection> [WHERE <filter>], as a tree."""
    query = exp.select(exp.column(vector_column, quoted=True),
                       exp.column(label_column, quoted=True)).from_(
        exp.to_table(collection, quoted=True))
    if filter is not None and filter.strip():
        query = query.where(parse_condition(filter))
    return query


def train_collection(catalog: Catalog, name: str, collection: str, label_column: str,
                     kind: str = "logistic", *, filter: str | None = None,
                     holdout: Any = None, epochs: Any = None, seed: Any = None,
                     hidden: Any = None, background: bool = True) -> ModelInfo:
    """Check everything, read the training rows (under the SQL limits, in one snapshot),
    then train; NotFound for an unknown collection, InvalidInput for a bad column, too few
    classes or a bad option, Conflict for a name in use. Nothing is created on a refusal."""
    models = registry_of(catalog)
    rec = catalog.collection(collection).record
    if label_column.lower() == rec.vector_column.lower():
        raise InvalidInput(f"the label column {label_column!r} is the collection's vector "
                           "column; labels must be text, numbers or booleans")
    columns = {c.lower(): c for c in rec.columns}
    column = columns.get(label_column.lower())
    if column is None:
        raise InvalidInput(f"collection {collection!r} has no column {label_column!r}; "
                           f"columns: {', '.join(rec.columns) or 'none'}")
    options = {"holdout": holdout, "epochs": epochs, "seed": seed, "hidden": hidden}
    models.options(kind, **options)
    models.check_new(name)
    x, labels, _ = training_data(
        catalog, training_query(rec.vector_column, column, rec.name, filter), None, [0],
        Session(), lambda: training_query(rec.vector_column, column, rec.name, filter))
    spec = {"collection": rec.name, "label_column": column, "kind": kind, "filter": filter,
            **options}
    source = json.dumps({k: v for k, v in spec.items() if v is not None})
    return models.train(name, kind, x, labels, source=source, collection=rec.name,
                        label_column=column, background=background, **options)
