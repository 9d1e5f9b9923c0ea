"""What `cctl-rec prepare` checks of raw files: columns and types from the footer, labels and the
copied ``user_group`` on read. Each problem is one ValueError naming the file, the column and the value."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cctl_rec.data.features.spec import FeatureConfig
from cctl_rec.data.features.transform import id_type_ok

PASSTHROUGH = {"ts": (pa.types.is_integer, pa.int64()), "is_harmful": (pa.types.is_boolean, pa.bool_()),
               "user_group": (pa.types.is_integer, pa.int8())}
"""Optional raw columns copied (the layout's analysis columns), when present: name -> (the raw
type check, the type written)."""


def check_footer(spec: FeatureConfig, d: str, path: str, arrow: pa.Schema, dtypes: dict[str, tuple[str, str]]
                 ) -> None:
    """Raises ValueError when ``path`` (a raw file of domain ``d``) lacks a configured column or
    holds one of another type; records each space's raw dtype in ``dtypes`` (space -> (dtype,
    where it was seen)) and refuses a second dtype."""
    dom = spec.domain(d)
    have = set(arrow.names)

    def need(column: str, what: str) -> pa.DataType:
        if column not in have:
            raise ValueError(f"data file {path} lacks column {column!r} ({what}); it has {sorted(have)[:20]}")
        return arrow.field(column).type

    cols = [(f, f.source_column, f.kind, f.space) for f in dom.features]
    if dom.other_seq is not None:
        other = "src" if d == "tgt" else "tgt"
        cols.append((None, dom.other_seq.column, "id_list", spec.domain(other).feature("item_id").space))
    for f, column, kind, space in cols:
        label = f"domains.{d}.{'other_seq' if f is None else 'features ' + repr(f.name)}"
        t = need(column, label)
        if kind == "dense":
            if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
                raise ValueError(f"data file {path}: column {column!r} ({label}, dense) has type {t}; expected a "
                                 f"number (float or int)")
            continue
        got, want = id_type_ok(t, kind)
        if not got:
            raise ValueError(f"data file {path}: column {column!r} ({label}) has type {t}; expected {want}")
        declared = f.dtype if f is not None and f.dtype != "auto" else None
        if declared is None:  # another feature of the space may declare it
            declared = next((g.dtype for dd in ("tgt", "src") for g in spec.domain(dd).features
                             if g.space == space and g.dtype != "auto"), None)
        if declared is not None and got != declared:
            raise ValueError(f"data file {path}: column {column!r} ({label}) holds {got} ids but space {space!r} is "
                             f"declared dtype {declared}; expected {declared} ids (or change the dtype)")
        seen = dtypes.setdefault(space, (got, f"column {column!r} of {path}"))
        if seen[0] != got:
            raise ValueError(f"data file {path}: column {column!r} ({label}) holds {got} ids but space {space!r} got "
                             f"{seen[0]} ids from {seen[1]}; expected one id type per space")
    lab = dom.label
    t = need(lab.column, f"domains.{d}.label")
    ok = (pa.types.is_integer(t) or pa.types.is_floating(t)) if lab.min_positive is not None else \
        (pa.types.is_integer(t) or pa.types.is_boolean(t))
    if not ok:
        want = "a number (label.min_positive is set)" if lab.min_positive is not None else "int or bool 0/1"
        raise ValueError(f"data file {path}: label column {lab.column!r} has type {t}; expected {want}")
    for c, (fits, written) in PASSTHROUGH.items():
        if c in have and not fits(arrow.field(c).type):
            want = "bool" if written == pa.bool_() else "int"
            raise ValueError(f"data file {path}: column {c!r} has type {arrow.field(c).type}; expected {want} "
                             f"(it is copied into the dataset)")


def check_passthrough(table: pa.Table, path: str) -> None:
    """Raises ValueError when a copied ``user_group`` column holds a null or a value other than
    0 (warm) / 1 (cold): the trainer would find it only when it evaluates."""
    if "user_group" in table.column_names:
        g = table.column("user_group")
        bad = g.null_count or pc.any(pc.invert(pc.is_in(g, value_set=pa.array([0, 1], g.type)))).as_py()
        if bad:
            raise ValueError(f"data file {path}: column 'user_group' holds a null or a value other than 0 (warm) and "
                             f"1 (cold); expected 0 or 1 on every row (or drop the column)")


def labels(spec: FeatureConfig, d: str, table: pa.Table, path: str) -> np.ndarray:
    """N int8 labels of a raw batch; a null, or a value other than 0/1 without ``min_positive``, fails."""
    lab = spec.domain(d).label
    col = table.column(lab.column)
    if col.null_count:
        raise ValueError(f"data file {path}: label column {lab.column!r} has {col.null_count} null value(s); "
                         f"expected a label on every row")
    if lab.min_positive is not None:
        return pc.greater_equal(col, lab.min_positive).to_numpy(zero_copy_only=False).astype(np.int8)
    y = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(f"data file {path}: label column {lab.column!r} has value {int(y[bad][0])}; expected 0 or 1 "
                         f"(for ratings set label.min_positive)")
    return y.astype(np.int8)
