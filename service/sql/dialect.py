"""The dotsearch SQL dialect: sqlglot's SingleStore plus `<*>`, `VECTOR(d, F16|BF16)`, the
MemSQL forms sqlglot does not parse yet (`REPLACE INTO`, `RENAME TABLE`, `SHARD KEY`,
`SORT KEY`, `KEY ... USING CLUSTERED COLUMNSTORE`), and trained models (`CREATE MODEL`,
`DROP MODEL`, `SHOW MODELS`, `DESCRIBE MODEL`, `PREDICT(m, v)`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import sqlglot
from sqlglot import TokenType, exp
from sqlglot.dialects.singlestore import SingleStore
from sqlglot.errors import ParseError, TokenError
from sqlglot.parsers.singlestore import SingleStoreParser
from sqlglot.trie import new_trie

from service.errors import QueryError, QueryTooLarge

# `<*>` needs a token of its own; CARET_AT (Postgres `^@`) is unused by the MySQL family.
DOT_TOKEN = TokenType.CARET_AT
# The `kind` of the Create, Drop and Describe trees of the model statements.
MODEL_KIND = "MODEL"


class Dotsearch(SingleStore):
    """SingleStore SQL with the infix dot product and half-precision vector columns."""

    class Tokenizer(SingleStore.Tokenizer):
        KEYWORDS: ClassVar = {**SingleStore.Tokenizer.KEYWORDS, "<*>": DOT_TOKEN}
        # Parsed as statements below, not swallowed as opaque commands.
        COMMANDS: ClassVar = SingleStore.Tokenizer.COMMANDS - {TokenType.REPLACE, TokenType.RENAME}

    class Parser(SingleStoreParser):
        FACTOR: ClassVar[dict[TokenType, Any]] = {
            **SingleStoreParser.FACTOR,
            DOT_TOKEN: exp.DotProduct,
        }

        STATEMENT_PARSERS: ClassVar[dict[TokenType, Any]] = {
            **SingleStoreParser.STATEMENT_PARSERS,
            TokenType.REPLACE: lambda self: self._parse_replace(),
            TokenType.RENAME: lambda self: self._parse_rename_table(),
        }
        # SingleStore's table keys: `SHARD KEY (cols)` and `SORT KEY (cols)`.
        SCHEMA_UNNAMED_CONSTRAINTS: ClassVar = {
            *SingleStoreParser.SCHEMA_UNNAMED_CONSTRAINTS, "SHARD", "SORT"}
        CONSTRAINT_PARSERS: ClassVar[dict[str, Any]] = {
            **SingleStoreParser.CONSTRAINT_PARSERS,
            "SHARD": lambda self: self._parse_table_key("SHARD"),
            "SORT": lambda self: self._parse_table_key("SORT"),
        }
        # `SHOW MODELS` (the trained models), beside SingleStore's SHOW forms.
        SHOW_PARSERS: ClassVar[dict[str, Any]] = {
            **SingleStoreParser.SHOW_PARSERS,
            "MODELS": lambda self: self.expression(exp.Show(this="MODELS")),
        }
        SHOW_TRIE: ClassVar = new_trie(key.split(" ") for key in SHOW_PARSERS)
        # PREDICT(m, v) is dotsearch's, not BigQuery's ML.PREDICT: an ordinary call whose
        # first argument names a model (service/sql/predict.py plans it).
        FUNCTIONS: ClassVar[dict[str, Any]] = {
            k: v for k, v in SingleStoreParser.FUNCTIONS.items() if k != "PREDICT"}

        def _at_model(self) -> bool:
            """The next token is MODEL followed by a name (a table called `model` stays a
            table: `DESCRIBE model`)."""
            if self._curr is None or self._curr.text.upper() != MODEL_KIND:
                return False
            if self._index + 1 >= len(self._tokens):
                return False
            return self._tokens[self._index + 1].token_type not in (TokenType.SEMICOLON,
                                                                    TokenType.DOT)

        def _parse_model_name(self) -> exp.Table:
            name = self._parse_id_var(any_token=False)
            if name is None:
                self.raise_error("expected a model name")
            return exp.Table(this=name)

        def _parse_create(self) -> exp.Create | exp.Command:
            """`CREATE MODEL [IF NOT EXISTS] m KIND logistic|mlp [WITH (option = value,
            ...)] AS SELECT <vector>, <label> FROM ...`, or any other CREATE."""
            if not self._at_model():
                return super()._parse_create()
            self._advance()
            exists = self._parse_exists(not_=True)
            name = self._parse_model_name()
            if not self._match_text_seq("KIND"):
                self.raise_error("expected KIND logistic or KIND mlp after the model name")
            kind = self._parse_var(any_token=True)
            if kind is None:
                self.raise_error("expected a model kind (logistic or mlp) after KIND")
            options = [exp.Property(this=exp.var("KIND"), value=kind)]
            if self._match(TokenType.WITH):
                options += self._parse_wrapped_csv(self._parse_model_option)
            if not self._match(TokenType.ALIAS):
                self.raise_error("expected AS SELECT <vector>, <label> FROM ...")
            query = self._parse_ddl_select()
            if query is None:
                self.raise_error("expected a SELECT after AS")
            return self.expression(exp.Create(
                this=name, kind=MODEL_KIND, exists=exists, expression=query,
                properties=exp.Properties(expressions=options)))

        def _parse_model_option(self) -> exp.Property:
            key = self._parse_var(any_token=True)
            if key is None or not self._match(TokenType.EQ):
                self.raise_error("expected option = value")
            value = self._parse_unary()
            if value is None:
                self.raise_error("expected a value")
            return exp.Property(this=key, value=value)

        def _parse_drop(self, exists: bool = False, kind: str | None = None) -> Any:
            """`DROP MODEL [IF EXISTS] m`, or any other DROP."""
            if not self._at_model():
                return super()._parse_drop(exists=exists, kind=kind)
            self._advance()
            if_exists = self._parse_exists()
            return self.expression(exp.Drop(tables=[self._parse_model_name()],
                                            kind=MODEL_KIND, exists=bool(if_exists)))

        def _parse_describe(self) -> exp.Describe:
            """`DESCRIBE MODEL m`, or any other DESCRIBE."""
            if not self._at_model():
                return super()._parse_describe()
            self._advance()
            return self.expression(exp.Describe(this=self._parse_model_name(),
                                                kind=MODEL_KIND))

        def _parse_vector_expressions(self, expressions: list[exp.Expr]) -> list[exp.Expr]:
            if expressions[1].name.upper() in ("F16", "BF16"):  # half-precision storage
                return [exp.DataType.build("FLOAT"), expressions[0],
                        exp.var(expressions[1].name.upper())]
            return super()._parse_vector_expressions(expressions)

        def _parse_replace(self) -> exp.Expr:
            """`REPLACE [INTO] t ...`: MySQL's upsert, an INSERT whose alternative is REPLACE."""
            insert = self._parse_insert()
            insert.set("alternative", "REPLACE")
            return insert

        def _parse_rename_table(self) -> exp.Expr:
            """`RENAME TABLE a TO b`: the same tree as `ALTER TABLE a RENAME TO b`."""
            if not self._match(TokenType.TABLE):
                return self._parse_as_command(self._prev)
            this = self._parse_table(schema=True)
            self._match_text_seq("TO")
            target = self._parse_table(schema=True)
            if self._match(TokenType.COMMA):
                self.raise_error("RENAME TABLE renames one table at a time")
            return self.expression(exp.Alter(this=this, kind="TABLE",
                                             actions=[exp.AlterRename(this=target)]))

        def _parse_table_key(self, kind: str) -> exp.Expr:
            self._match(TokenType.KEY)
            columns = self._parse_wrapped_csv(self._parse_id_var, optional=True)
            return self.expression(exp.IndexColumnConstraint(kind=kind, expressions=columns))

        def _parse_index_constraint_options(self) -> list[exp.IndexConstraintOption]:
            """MySQL's key options, and SingleStore's two-word `USING CLUSTERED COLUMNSTORE`."""
            if self._match_text_seq("USING", "CLUSTERED", "COLUMNSTORE"):
                using = exp.IndexConstraintOption(using="CLUSTERED COLUMNSTORE")
                return [using, *self._parse_index_constraint_options()]
            return super()._parse_index_constraint_options()


DIALECT = Dotsearch()
DEFAULT_MAX_TOKENS = 50_000
# Statements up to this long are parsed once and copied after (clients repeat the same
# parameterised text); longer ones, such as inline vectors, are one-offs.
PARSE_CACHE_MAX_CHARS = 4096


def position_of(node: exp.Expr | None) -> dict[str, int] | None:
    """The line/column where a parsed node (or its first located descendant) starts."""
    if node is None:
        return None
    for sub in node.walk():
        meta: dict[str, Any] | None = getattr(sub, "_meta", None)
        if meta and "line" in meta and "col" in meta:
            width = int(meta.get("end", 0)) - int(meta.get("start", 0))
            return {"line": int(meta["line"]), "column": max(1, int(meta["col"]) - width)}
    return None


def error_at(message: str, node: exp.Expr | None = None) -> QueryError:
    return QueryError(message, position=position_of(node))


def parse_script(sql: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[exp.Expr]:
    """Parse one or more ';'-separated statements; QueryError with position on failure,
    QueryTooLarge past ``max_tokens`` (counted before parsing, which costs far more)."""
    if not isinstance(sql, str):
        raise QueryError(f"sql must be a string, got {type(sql).__name__}")
    if not sql.strip():
        raise QueryError("empty query")
    if len(sql) > 4_000_000:
        raise QueryTooLarge("query text too long")
    if len(sql) <= PARSE_CACHE_MAX_CHARS:
        return [s.copy() for s in _parse_cached(sql, max_tokens)]  # planning rewrites trees
    return list(_parse(sql, max_tokens))


@lru_cache(maxsize=256)
def _parse_cached(sql: str, max_tokens: int) -> tuple[exp.Expr, ...]:
    return _parse(sql, max_tokens)


def _parse(sql: str, max_tokens: int) -> tuple[exp.Expr, ...]:
    try:
        tokens = DIALECT.tokenize(sql)
        if len(tokens) > max_tokens:
            raise QueryTooLarge(f"the SQL text has {len(tokens)} tokens; the limit is "
                                f"{max_tokens} (DOTSEARCH_SQL_MAX_TOKENS)")
        statements = DIALECT.parser().parse(tokens, sql)
    except QueryError:
        raise
    except ParseError as exc:
        raise _syntax_error("syntax error", exc) from exc
    except TokenError as exc:
        raise QueryError(f"syntax error: {str(exc).splitlines()[0]}") from exc
    except RecursionError as exc:
        raise QueryTooLarge("the statement nests too deeply for the SQL parser (it takes a few "
                            "dozen levels of parentheses or calls)") from exc
    except Exception as exc:  # sqlglot may raise plain errors on odd input
        raise QueryError(f"syntax error: {type(exc).__name__}: {exc}") from exc
    out = tuple(s for s in statements if s is not None)
    if not out:
        raise QueryError("empty query")
    return out


def _syntax_error(what: str, exc: ParseError) -> QueryError:
    """sqlglot's first parse error as a QueryError with its line and column."""
    first = exc.errors[0] if exc.errors else {}
    desc = str(first.get("description") or exc).split("\n")[0]
    pos = None
    if first.get("line") is not None:
        pos = {"line": int(first["line"]), "column": int(first["col"])}
    return QueryError(f"{what}: {desc}", position=pos)


def parse_condition(text: str) -> exp.Expr:
    """Parse a boolean expression (a search filter)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("filter must be a non-empty SQL boolean expression")
    try:
        cond = sqlglot.parse_one(text, read=DIALECT, into=exp.Condition)
    except ParseError as exc:
        raise _syntax_error("filter syntax error", exc) from exc
    except RecursionError as exc:
        raise QueryError("filter nested too deeply") from exc
    except Exception as exc:
        raise QueryError(f"filter syntax error: {type(exc).__name__}: {exc}") from exc
    return cond


def to_duckdb(node: exp.Expr) -> str:
    """Render an (already checked and rewritten) AST as DuckDB SQL."""
    try:
        return node.sql(dialect="duckdb", copy=False)
    except Exception as exc:
        raise error_at(f"cannot translate statement: {exc}", node) from exc
