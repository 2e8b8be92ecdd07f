"""DDL: CREATE TABLE (SingleStore's and MemSQL's forms), ALTER TABLE, RENAME TABLE, DROP
TABLE, SHOW TABLES and DESCRIBE."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlglot import exp

from service.batches import MAX_SHARDS, VECTOR_ELEMENTS
from service.catalog_values import QueryResult
from service.errors import InvalidInput
from service.index_protocol import METRICS
from service.sql.casts import vector_dim, vector_type
from service.sql.dialect import error_at

if TYPE_CHECKING:
    from service.collections import CollectionStore
    from service.storage import CollectionRecord

BINARY_TYPES = (exp.DType.BINARY, exp.DType.VARBINARY, exp.DType.BLOB, exp.DType.TINYBLOB,
                exp.DType.MEDIUMBLOB, exp.DType.LONGBLOB)
# Column attributes accepted and what they mean here (the README lists them).
NO_OP_ATTRIBUTES = (exp.NotNullColumnConstraint, exp.CommentColumnConstraint,
                    exp.CollateColumnConstraint, exp.CharacterSetColumnConstraint)
ID_ATTRIBUTES = (exp.AutoIncrementColumnConstraint, exp.PrimaryKeyColumnConstraint)
SUPPORTED = ("SELECT, EXPLAIN, SET @var, CREATE TABLE, ALTER TABLE, RENAME TABLE, DROP TABLE, "
             "SHOW TABLES, DESCRIBE, INSERT, REPLACE, UPDATE, DELETE")


def execute_ddl(catalog: CollectionStore, stmt: exp.Expr) -> QueryResult:
    if isinstance(stmt, exp.Create):
        return create_table(catalog, stmt)
    if isinstance(stmt, exp.Drop):
        return drop_table(catalog, stmt)
    if isinstance(stmt, exp.Alter):
        return alter_table(catalog, stmt)
    if isinstance(stmt, exp.Show):
        if str(stmt.name).upper() != "TABLES":
            raise error_at("only SHOW TABLES is supported", stmt)
        names = [[info.name] for info in catalog.list_collections()]
        return QueryResult(["table"], ["VARCHAR"], names)
    if isinstance(stmt, exp.Describe) and isinstance(stmt.this, exp.Table):
        return describe(catalog, stmt.this)
    raise error_at(f"unsupported statement {type(stmt).__name__.upper()}; supported: "
                   f"{SUPPORTED}", stmt)


@dataclass
class TableSpec:
    """What a CREATE TABLE declares, in declared order."""

    order: list[str] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    vector: tuple[str, int, str, str] | None = None  # name, dim, dtype, declared type
    binaries: list[exp.ColumnDef] = field(default_factory=list)
    has_id: bool = False
    auto_increment: bool = False


def create_table(catalog: CollectionStore, stmt: exp.Create) -> QueryResult:
    schema = stmt.this
    if str(stmt.args.get("kind", "")).upper() != "TABLE" or not isinstance(schema, exp.Schema):
        raise error_at("only CREATE TABLE name (columns...) is supported", stmt)
    table = schema.this
    if not isinstance(table, exp.Table) or table.args.get("db"):
        raise error_at("CREATE TABLE needs a plain table name", stmt)
    spec = TableSpec()
    keys: list[exp.Expr] = []
    for item in schema.expressions:
        if isinstance(item, exp.ColumnDef) and isinstance(item.kind, exp.DataType):
            _column(spec, item)
        elif isinstance(item, exp.IndexColumnConstraint | exp.PrimaryKey):
            keys.append(item)
        else:
            raise error_at("expected a column definition (name TYPE) or a KEY, SHARD KEY or "
                           "SORT KEY", item)
    _binary_vector(spec)
    if spec.vector is None:
        raise error_at("a table needs one column of type VECTOR(d), VECTOR(d, F16) or "
                       "VECTOR(d, BF16), or one binary(N), varbinary(N) or BLOB column of "
                       "packed float32", stmt)
    if not spec.has_id:
        raise error_at("a table needs an `id BIGINT PRIMARY KEY` column", stmt)
    for key in keys:
        _check_key(key, spec)
    if stmt.args.get("exists") and catalog.resolve(table.name) is not None:
        return QueryResult.affected()
    name, dim, dtype, declared = spec.vector
    metric, shards = _table_options(stmt)
    try:
        catalog.create_collection(table.name, dim, metric, dtype, spec.columns,
                                  vector_column=name, column_order=spec.order,
                                  vector_type=declared, auto_increment=spec.auto_increment,
                                  shards=shards)
    except InvalidInput as exc:
        raise error_at(exc.message, stmt) from exc
    return QueryResult.affected()


def _column(spec: TableSpec, col: exp.ColumnDef) -> None:
    """One column definition into ``spec`` (the vector, the id, or a metadata column)."""
    kind = col.kind
    assert isinstance(kind, exp.DataType)
    name = col.name
    is_id = name.lower() == "id"
    if is_id:
        name = "id"
    for constraint in col.constraints:
        attribute = constraint.args.get("kind")
        if isinstance(attribute, ID_ATTRIBUTES):
            if not is_id:
                raise error_at(f"{attribute.key.upper()} belongs on the id column", constraint)
            spec.auto_increment |= isinstance(attribute, exp.AutoIncrementColumnConstraint)
        elif isinstance(attribute, exp.DefaultColumnConstraint):
            if not isinstance(attribute.this, exp.Null):
                raise error_at("only DEFAULT NULL is supported", constraint)
        elif not isinstance(attribute, NO_OP_ATTRIBUTES):
            raise error_at(f"column attribute {constraint.sql()} is not supported", constraint)
    if name.lower() in {n.lower() for n in spec.order}:
        raise error_at(f"column {name!r} declared twice", col)
    spec.order.append(name)
    if kind.is_type(exp.DType.VECTOR):
        if spec.vector is not None:
            raise error_at("a table holds exactly one VECTOR column", col)
        declared = vector_type(kind, col)
        stored = {element: dtype for dtype, element in VECTOR_ELEMENTS.items()}
        if declared.element not in stored:
            raise error_at("VECTOR columns hold F32, F16 or BF16 elements (casts take the "
                           "others)", col)
        dtype = stored[declared.element]
        spec.vector = (name, declared.dim, dtype, declared.spelled())
    elif kind.is_type(*BINARY_TYPES):
        spec.binaries.append(col)
    elif is_id:
        if not kind.is_type(exp.DType.BIGINT, exp.DType.INT):
            raise error_at("the id column must be BIGINT", col)
        spec.has_id = True
    else:
        spec.columns[name] = kind.this.name


def _binary_vector(spec: TableSpec) -> None:
    """MemSQL stored vectors as packed float32 in a binary column: with no VECTOR column,
    the table's one binary(N), varbinary(N) or BLOB column is its vector (N/4 elements; a
    BLOB says its dimension in a comment, 'dim=N')."""
    if not spec.binaries:
        return
    if spec.vector is not None or len(spec.binaries) > 1:
        raise error_at("binary columns hold the table's vector: a table has one of them and "
                       "no VECTOR column (metadata columns cannot be binary)", spec.binaries[-1])
    col = spec.binaries[0]
    kind = col.kind
    assert isinstance(kind, exp.DataType)
    if kind.expressions:
        size = vector_dim(kind.expressions, col)
        if size % 4:
            raise error_at(f"a binary vector column holds packed float32 (4 bytes each): "
                           f"{size} bytes is not a multiple of 4", col)
        dim = size // 4
    else:
        dim = _comment_dim(col)
    spec.vector = (spec.order[spec.order.index(col.name)], dim, "float32", kind.sql())


def _comment_dim(col: exp.ColumnDef) -> int:
    for constraint in col.constraints:
        attribute = constraint.args.get("kind")
        if isinstance(attribute, exp.CommentColumnConstraint):
            text = attribute.name.strip().lower().replace(" ", "")
            if text.startswith("dim=") and text[4:].isdigit() and int(text[4:]) > 0:
                return int(text[4:])
    raise error_at("a BLOB vector column needs its dimension: COMMENT 'dim=N' (or declare "
                   "binary(4*N))", col)


def _check_key(key: exp.Expr, spec: TableSpec) -> None:
    """Keys are accepted for compatibility and change nothing here (ids are the primary
    key, a search scans every row); their columns must exist."""
    if isinstance(key, exp.PrimaryKey):
        names = [e.name.lower() for e in key.expressions]
        if names != ["id"]:
            raise error_at("the primary key is the id column: PRIMARY KEY (id)", key)
        return
    declared = {n.lower() for n in spec.order}
    for part in key.expressions:
        if part.name.lower() not in declared:
            raise error_at(f"key on unknown column {part.name!r}", key)


def _table_options(stmt: exp.Create) -> tuple[str, int | None]:
    """The table COMMENT's options, `COMMENT = 'metric=cosine shards=4'`: the index metric
    (SQL-made tables default to dot, SingleStore's habit) and the ray backend's shard
    count; other words of the comment are just a comment."""
    metric, shards = "dot", None
    props = stmt.args.get("properties")
    for prop in props.expressions if props is not None else []:
        if not isinstance(prop, exp.SchemaCommentProperty):
            continue
        for word in prop.this.name.lower().replace(",", " ").split():
            key, _, value = word.partition("=")
            if key == "metric":
                if value not in METRICS:
                    raise error_at(f"metric must be one of {', '.join(METRICS)}", prop)
                metric = value
            elif key == "shards":
                if not value.isdigit() or not 1 <= int(value) <= MAX_SHARDS:
                    raise error_at(f"shards must be an integer in 1..{MAX_SHARDS}", prop)
                shards = int(value)
    return metric, shards


def drop_table(catalog: CollectionStore, stmt: exp.Drop) -> QueryResult:
    if str(stmt.args.get("kind", "")).upper() != "TABLE":
        raise error_at("only DROP TABLE is supported", stmt)
    tables = list(stmt.args.get("tables") or []) or [stmt.this]
    for table in tables:
        if not isinstance(table, exp.Table) or table.args.get("db"):
            raise error_at("DROP TABLE takes plain table names", stmt)
        canonical = catalog.resolve(table.name)
        if canonical is None:
            if stmt.args.get("exists"):
                continue
            raise error_at(f"unknown table {table.name!r}", table)
        catalog.drop_collection(canonical)
    return QueryResult.affected()


def alter_table(catalog: CollectionStore, stmt: exp.Alter) -> QueryResult:
    """ADD/DROP/RENAME COLUMN on metadata columns (RENAME also on the vector column) and
    RENAME TO. Every action is checked before the first one runs."""
    table = stmt.this
    if str(stmt.args.get("kind", "")).upper() != "TABLE" or not isinstance(table, exp.Table):
        raise error_at("only ALTER TABLE is supported", stmt)
    name = catalog.resolve(table.name)
    if name is None:
        raise error_at(f"unknown table {table.name!r}", table)
    rec = catalog.collection(name).record
    order = list(rec.column_order)
    steps: list[Callable[[str], Any]] = []
    for action in stmt.args.get("actions") or []:
        steps.append(_alter_step(catalog, action, rec, order))
    for step in steps:
        try:
            result = step(name)
        except InvalidInput as exc:
            raise error_at(exc.message, stmt) from exc
        if isinstance(result, str):
            name = result
    return QueryResult.affected()


def _alter_step(catalog: CollectionStore, action: exp.Expr, rec: CollectionRecord,
                order: list[str]) -> Callable[[str], Any]:
    """One ALTER action, checked against the columns as the earlier actions leave them
    (``order`` is updated), as a call to make on the catalog."""
    def find(column: str, node: exp.Expr) -> str:
        for existing in order:
            if existing.lower() == column.lower():
                return existing
        raise error_at(f"unknown column {column!r} in table {rec.name!r}", node)

    if isinstance(action, exp.ColumnDef):
        kind = action.kind
        if not isinstance(kind, exp.DataType):
            raise error_at("ADD COLUMN needs a type", action)
        if kind.is_type(exp.DType.VECTOR, *BINARY_TYPES):
            raise error_at(f"a table holds exactly one vector column ({rec.vector_column})",
                           action)
        if any(c.lower() == action.name.lower() for c in order):
            raise error_at(f"column {action.name!r} already exists", action)
        order.append(action.name)
        column, sql_type = action.name, kind.this.name
        return lambda table: catalog.add_column(table, column, sql_type)
    if isinstance(action, exp.Drop) and str(action.args.get("kind", "")).upper() == "COLUMN":
        names = [find(c.name, action) for c in action.args.get("tables") or []]
        for column in names:
            _not_key_or_vector(column, rec, action, "dropped")
            order.remove(column)
        return lambda table: [catalog.drop_column(table, c) for c in names]
    if isinstance(action, exp.RenameColumn):
        old = find(action.this.name, action)
        new = action.args["to"].name
        if old == "id":
            raise error_at("the id column cannot be renamed", action)
        if any(c.lower() == new.lower() for c in order):
            raise error_at(f"column {new!r} already exists", action)
        order[order.index(old)] = new
        return lambda table: catalog.rename_column(table, old, new)
    if isinstance(action, exp.AlterRename):
        new_name = action.this.name

        def rename(table: str) -> str:
            catalog.rename_collection(table, new_name)
            return new_name

        return rename
    if isinstance(action, exp.AlterColumn | exp.ModifyColumn):
        target = action.this if isinstance(action, exp.ModifyColumn) else action
        column = find(target.name, action)
        _not_key_or_vector(column, rec, action, "retyped")
        raise error_at("changing a column's type is not supported; add a new column and "
                       "UPDATE it", action)
    raise error_at("ALTER TABLE supports ADD COLUMN, DROP COLUMN, RENAME COLUMN and RENAME TO",
                   action)


def _not_key_or_vector(column: str, rec: CollectionRecord, node: exp.Expr, what: str) -> None:
    if column == "id":
        raise error_at(f"the id column cannot be {what}", node)
    if column == rec.vector_column:
        raise error_at(f"the vector column {column!r} cannot be {what}", node)


def describe(catalog: CollectionStore, table: exp.Table) -> QueryResult:
    """MySQL's DESCRIBE: Field, Type, Null, Key, Default, Extra in declared order."""
    canonical = catalog.resolve(table.name)
    if canonical is None:
        raise error_at(f"unknown table {table.name!r}", table)
    rec = catalog.collection(canonical).record
    rows: list[list[Any]] = []
    for column in rec.column_order:
        if column == "id":
            rows.append(["id", "BIGINT", "NO", "PRI", None,
                         "auto_increment" if rec.auto_increment else ""])
        elif column == rec.vector_column:
            rows.append([column, rec.vector_type, "NO", "", None, ""])
        else:
            rows.append([column, rec.columns[column], "YES", "", None, ""])
    return QueryResult(["Field", "Type", "Null", "Key", "Default", "Extra"],
                       ["VARCHAR"] * 6, rows)
