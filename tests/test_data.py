"""Parquet -> KJT: layout, rank partitioning, truncation, and one-line errors on bad files."""

import glob

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cctl_rec.config import DataConfig
from cctl_rec.data.loader import build_batch
from cctl_rec.data.reader import ParquetStream, features_kjt
from cctl_rec.schema import synthetic_schemas
from tests.tinydata import N_BRAND, N_CAT, N_ITEMS, N_USERS

SCHEMAS = synthetic_schemas(N_USERS, N_ITEMS, N_CAT, N_BRAND, n_cities=30)


def _files(root, split):
    return sorted(glob.glob(f"{root}/{split}/*.parquet"))


@pytest.mark.reliability("data", "sequences longer than the configured maximum", expect="default "
                         "(data.long_seq=truncate): each sequence keeps its newest max_seq_len items")
def test_kjt_layout_and_truncation(tiny_data):
    ts = SCHEMAS["tgt"]
    rows = next(iter(ParquetStream(_files(tiny_data, "tgt/train"), ts, 16)))
    kjt = features_kjt(rows, ts, max_seq_len=5)
    assert kjt.keys() == ts.keys and kjt.stride() == 16
    d = kjt.to_dict()
    np.testing.assert_array_equal(d["t_user_id"].values().numpy(), rows.table.column("user_id").to_numpy())
    seqs = rows.table.column("seq").to_pylist()
    lens = d["t_seq"].lengths().tolist()
    assert lens == [min(len(s), 5) for s in seqs]
    got = d["t_seq"].values().tolist()
    want = [x for s in seqs for x in s[-5:]]  # the newest 5 items
    assert got == want


def test_batch_holds_ren_rows_after_the_source_rows(tiny_data):
    t = next(iter(ParquetStream(_files(tiny_data, "tgt/train"), SCHEMAS["tgt"], 8)))
    s = next(iter(ParquetStream(_files(tiny_data, "src/train"), SCHEMAS["src"], 24)))
    b = build_batch(t, s, SCHEMAS, DataConfig(max_seq_len=20), shared=("gender", "category"))
    assert b.src.stride() == 24 + 8 and b.num_src == 24
    assert "s_gender" not in b.src.keys() and "s_age" in b.src.keys()
    m = b.mixed.to_dict()   # target rows, then the source rows' shared attributes in target keys
    assert b.mixed.stride() == 8 + 24 and b.mixed.keys() == SCHEMAS["tgt"].keys
    np.testing.assert_array_equal(m["t_category"].values()[8:].numpy(), s.table.column("category").to_numpy())
    assert int(m["t_user_id"].lengths()[8:].sum()) == 0
    d = b.src.to_dict()
    np.testing.assert_array_equal(d["s_user_id"].values()[24:].numpy(), t.table.column("user_id").to_numpy())
    assert int(d["s_age"].lengths()[24:].sum()) == 0           # other source features empty for REN rows
    other = t.table.column("other_seq").to_pylist()
    assert d["s_seq"].lengths()[24:].tolist() == [len(o) for o in other]
    assert torch.equal(b.seq_mask, b.user_in_other & torch.tensor([len(x) > 0 and len(o) > 0 for x, o in
                                                                    zip(t.table.column("seq").to_pylist(), other)]))


def test_ranks_get_disjoint_equal_row_ranges(tiny_data):
    files = _files(tiny_data, "tgt/valid")
    parts = [[r.table.column("ts").to_pylist() for r in ParquetStream(files, SCHEMAS["tgt"], 100, rank, 2,
                                                                      drop_last=False)] for rank in (0, 1)]
    a = [x for b in parts[0] for x in b]
    b = [x for b in parts[1] for x in b]
    assert len(a) == len(b) and not set(zip(a, [0] * len(a))) & set(zip(b, [1] * len(b)))
    assert len(parts[0]) == len(parts[1])


def _write(path, table):
    pq.write_table(table, path)
    return str(path)


def _tgt_table(tiny_data):
    return pq.read_table(_files(tiny_data, "tgt/train")[0]).slice(0, 64)


def _rel(case):
    return pytest.mark.reliability("data", case, expect="reader level: ValueError, one line naming the file, "
                                   "the column and the value")


@pytest.mark.parametrize("mutate,msg", [
    pytest.param(lambda t: t.drop_columns(["device"]), "lacks column(s) ['device'] of the tgt schema",
                 marks=_rel("missing column"), id="missing-column"),
    pytest.param(lambda t: t.set_column(t.schema.get_field_index("label"), "label", pa.array(np.full(64, 2, np.int8))),
                 "column 'label' has value 2; expected 0 or 1", marks=_rel("labels outside {0, 1}"), id="label-2"),
    pytest.param(lambda t: t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(np.full(64, -3))),
                 "column 'user_id' has negative id -3", marks=_rel("negative ids"), id="negative-id"),
    pytest.param(lambda t: t.set_column(t.schema.get_field_index("item_id"), "item_id",
                                        pa.array(np.full(64, 10 ** 9))),
                 f"column 'item_id' has id 1000000000 >= table size {N_ITEMS}", marks=_rel("ids >= table size"), id="id-beyond-table"),
    pytest.param(lambda t: t.set_column(t.schema.get_field_index("gender"), "gender",
                                        pa.array([None] * 64, pa.int64())),
                 "column 'gender' has 32 null value(s)", marks=_rel("null ids"), id="null-ids"),
    pytest.param(lambda t: t.set_column(t.schema.get_field_index("hour"), "hour", pa.array(np.zeros(64, np.float32))),
                 "column 'hour' has type float, expected integer", marks=_rel("wrong dtype"), id="float-id"),
])
def test_bad_rows_fail_with_one_line(tiny_data, tmp_path, mutate, msg):
    path = _write(tmp_path / "bad.parquet", mutate(_tgt_table(tiny_data)))
    with pytest.raises(ValueError) as e:
        rows = next(iter(ParquetStream([path], SCHEMAS["tgt"], 32)))
        build_batch(rows, None, SCHEMAS, DataConfig())
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert path in str(e.value)


@pytest.mark.reliability("data", "a source file given as target", expect="reader level: target files read "
                         "with the source schema: ValueError 'lacks column'")
def test_source_file_given_as_target(tiny_data):
    with pytest.raises(ValueError, match="lacks column"):
        ParquetStream(_files(tiny_data, "tgt/train"), SCHEMAS["src"], 32)


@pytest.mark.reliability("data", "truncated or corrupt Parquet", expect="reader level: a missing file raises "
                         "FileNotFoundError, an empty or junk file ValueError 'is not a readable Parquet file'")
def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParquetStream([str(tmp_path / "nope.parquet")], SCHEMAS["tgt"], 8)
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    for name in ("empty.parquet", "junk.parquet"):
        with pytest.raises(ValueError, match="is not a readable Parquet file"):
            ParquetStream([str(tmp_path / name)], SCHEMAS["tgt"], 8)


@pytest.mark.reliability("data", "sequences longer than the configured maximum", expect="reader level: "
                         "long_seq=fail raises ValueError naming data.max_seq_len")
def test_long_sequences_fail_when_asked(tiny_data):
    rows = next(iter(ParquetStream(_files(tiny_data, "tgt/train"), SCHEMAS["tgt"], 64)))
    with pytest.raises(ValueError, match="longer than data.max_seq_len=3"):
        features_kjt(rows, SCHEMAS["tgt"], 3, long_seq="fail")


def test_a_stream_keeps_at_most_the_file_it_reads_open(tiny_data):
    """An open ParquetFile keeps what it has read; over thousands of shards that is gigabytes.
    The stream holds only metadata and opens each file while reading its rows."""
    from cctl_rec.data.loader import Dataset
    from cctl_rec.data.reader import ParquetStream

    import os

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    data = Dataset(tiny_data)
    paths = data.paths("src/train")
    assert len(paths) > 1
    before = fds()
    st = ParquetStream(paths, data.schemas["src"], 4096, drop_last=False)
    assert fds() == before
    peak, rows = before, 0
    for r in st.iterate():
        rows += len(r)
        peak = max(peak, fds())
        if rows >= st.rows_per_rank:
            break
    assert rows == st.rows_per_rank and peak <= before + 1


def test_prefetch_yields_the_same_items_in_order_and_raises_where_the_reader_failed():
    from cctl_rec.data.prefetch import prefetch

    assert list(prefetch(iter(range(50)), 3)) == list(range(50))
    assert list(prefetch(iter(range(5)), 0)) == list(range(5))

    def broken():
        yield 1
        yield 2
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for x in prefetch(broken(), 2):
            got.append(x)
    assert got == [1, 2]


def test_closing_a_prefetch_stops_its_reader():
    import threading

    from cctl_rec.data.prefetch import prefetch

    read = []

    def endless():
        i = 0
        while True:
            read.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "cctl-prefetch" and t.is_alive() for t in threading.enumerate())
    n = len(read)
    assert n <= 3 + 2 + 1  # read ahead by at most depth (+ the one in the reader's hands)


def test_a_kjt_without_keys_keeps_the_row_count():
    """Every source feature looked up in the target tables (``model.share_ids`` on converted
    data) leaves the source KJT without keys; building it used to fail with "need at least one
    array to concatenate"."""
    from cctl_rec.data.reader import make_kjt

    kjt = make_kjt([], [{}, {}], [3, 2])
    assert kjt.keys() == [] and kjt.stride() == 5 and kjt.values().numel() == 0


def test_target_batches_carry_the_user_group_when_the_split_has_it(tiny_data, tmp_path):
    t = _tgt_table(tiny_data)
    groups = np.arange(64) % 3 == 0
    path = _write(tmp_path / "g.parquet", t.append_column("user_group", pa.array(groups.astype(np.int8))))
    b = build_batch(next(iter(ParquetStream([path], SCHEMAS["tgt"], 64))), None, SCHEMAS, DataConfig())
    assert b.tgt_group.tolist() == groups.astype(int).tolist()
    plain = build_batch(next(iter(ParquetStream(_files(tiny_data, "tgt/train"), SCHEMAS["tgt"], 8))), None, SCHEMAS,
                        DataConfig())
    assert plain.tgt_group is None and plain.to(torch.device("cpu")).tgt_group is None
    assert b.to(torch.device("cpu")).tgt_group.tolist() == b.tgt_group.tolist()


@pytest.mark.parametrize("column,msg", [
    (pa.array(np.full(64, 2, np.int8)), "column 'user_group' has value 2; expected 0 (warm) or 1 (cold)"),
    (pa.array(np.zeros(64, np.float32)), "column 'user_group' has type float, expected integer"),
])
def test_bad_user_groups_fail_with_one_line(tiny_data, tmp_path, column, msg):
    path = _write(tmp_path / "bad.parquet", _tgt_table(tiny_data).append_column("user_group", column))
    with pytest.raises(ValueError) as e:
        build_batch(next(iter(ParquetStream([path], SCHEMAS["tgt"], 32))), None, SCHEMAS, DataConfig())
    assert msg in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
