"""SingleStore's VECTOR type in SQL text: `VECTOR(n[, F32|F16|BF16|F64|I8|I16|I32|I64])` in column
definitions and in the `:>` / `!:>` casts, and the checks a cast value passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlglot import exp

from service.sql.dialect import error_at

# sqlglot's element type (SingleStore's alias) -> the element name and, for integers, range.
ELEMENTS: dict[exp.DType, tuple[str, tuple[int, int] | None]] = {
    exp.DType.FLOAT: ("F32", None),
    exp.DType.DOUBLE: ("F64", None),
    exp.DType.TINYINT: ("I8", (-(2**7), 2**7 - 1)),
    exp.DType.SMALLINT: ("I16", (-(2**15), 2**15 - 1)),
    exp.DType.INT: ("I32", (-(2**31), 2**31 - 1)),
    exp.DType.BIGINT: ("I64", (-(2**63), 2**63 - 1)),
}
F16_MAX = 65504.0
BF16_MAX = 3.3895313892515355e38  # larger float32 values round to inf in bfloat16
HALF_MAX = {"F16": F16_MAX, "BF16": BF16_MAX}
INTEGER_RANGES = {name: bounds for name, bounds in ELEMENTS.values() if bounds is not None}


@dataclass(frozen=True)
class VectorType:
    """A parsed `VECTOR(dim, element)`; every element type is held as float32 here."""

    dim: int
    element: str = "F32"

    def spelled(self) -> str:
        return f"VECTOR({self.dim})" if self.element == "F32" else \
            f"VECTOR({self.dim}, {self.element})"


def vector_type(kind: exp.DataType, node: exp.Expr) -> VectorType:
    """The dimension and element type of a VECTOR data type, or a QueryError at ``node``."""
    args = kind.expressions
    element = "F32"
    if args and isinstance(args[0], exp.DataType):
        found = next((e for t, e in ELEMENTS.items() if args[0].is_type(t)), None)
        if found is None:
            raise error_at("VECTOR elements must be one of F32, F16, BF16, F64, I8, I16, I32, "
                           "I64", node)
        element = found[0]
    if len(args) > 2 and args[2].name.upper() in HALF_MAX:
        element = args[2].name.upper()
    return VectorType(vector_dim(args, node), element)


def vector_dim(args: list[exp.Expr], node: exp.Expr) -> int:
    size = args[1] if len(args) > 1 else (args[0] if args else None)
    if isinstance(size, exp.DataTypeParam):
        size = size.this
    try:
        dim = int(str(size.name if size is not None else ""))
    except ValueError:
        raise error_at("VECTOR needs a dimension: VECTOR(d), VECTOR(d, F16) or "
                       "VECTOR(d, BF16)", node) from None
    if dim <= 0:
        raise error_at("VECTOR dimension must be positive", node)
    return dim


def cast_target(node: exp.Expr) -> VectorType | None:
    """The VECTOR type that ``node`` casts to (`x :> VECTOR(n)`, `x !:> VECTOR(n)`), or None."""
    if isinstance(node, exp.Cast) and isinstance(node.to, exp.DataType) and node.to.is_type(
        exp.DType.VECTOR
    ):
        return vector_type(node.to, node)
    return None


def check_cast(packed: bytes, target: VectorType, node: exp.Expr) -> bytes:
    """A value cast to ``target``: its length, and its elements within the element type."""
    count = len(packed) // 4
    if count != target.dim:
        raise error_at(f"cannot cast a vector of {count} elements to {target.spelled()}", node)
    values = np.frombuffer(packed, dtype="<f4")
    largest = HALF_MAX.get(target.element)
    if largest is not None and np.any(np.abs(values) > largest):
        raise error_at(f"{target.spelled()} holds values within +-{largest:g}", node)
    bounds = INTEGER_RANGES.get(target.element)
    if bounds is not None:
        low, high = bounds
        if np.any(values != np.round(values)) or np.any(values < low) or np.any(values > high):
            raise error_at(f"{target.spelled()} holds integers in {low}..{high}", node)
    return packed
