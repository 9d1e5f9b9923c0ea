"""Plans beyond two ranks: TorchRec's planner splits the mixed and pure target tables across ranks;
make_plan repairs that by mirroring (the design: one plan for both, the k-step sync is a shard-local
copy) and a hand-made plan that splits them is refused in one line before anything is sharded.

Everything here plans on meta tensors (no process, no GPU): the CUDA-only row_wise /
table_row_wise plans at 4 and 8 ranks are planned, not run.
"""

import copy

import pytest
import torch

from cctl_rec.config import ModelConfig
from cctl_rec.distributed.sharding import (UnmirroredPlanError, apply_sparse_optimizer, check_mirrored, make_plan,
                                           planner_plan, shard)
from cctl_rec.models.cctl import CCTL
from cctl_rec.schema import synthetic_schemas
from tests.tinydata import N_BRAND, N_CAT, N_ITEMS, N_USERS

DIM = 16


def _model(device_type="cpu"):
    schemas = synthetic_schemas(N_USERS, N_ITEMS, N_CAT, N_BRAND, n_cities=30)
    model = CCTL(schemas, ModelConfig(tower=(16, 8), san_hidden=(8,), embedding_dim=DIM))
    apply_sparse_optimizer(model, "exact_rowwise_adagrad", 0.1, device_type)
    return model


def _layout(ps):
    spec = ps.sharding_spec
    return (ps.sharding_type, ps.compute_kernel, ps.ranks,
            [(s.shard_offsets, s.shard_sizes, s.placement.rank()) for s in (spec.shards if spec else [])])


def _split_tables(plan):
    """Tables whose pure copy is placed unlike the mixed one."""
    mixed, pure = plan.plan["mixed_tgt"], plan.plan["pure_tgt"]
    return sorted(t for t in mixed if _layout(mixed[t]) != _layout(pure[t]))


# (world size, device, sharding, ranks per host, does TorchRec's own plan split mixed and pure?)
CASES = [
    (4, "cpu", "table_wise", None, True),
    (8, "cpu", "table_wise", None, True),
    (4, "cpu", "auto", None, True),
    (4, "cuda", "row_wise", None, False),
    (8, "cuda", "row_wise", None, False),
    (4, "cuda", "table_row_wise", 2, True),   # 2 hosts x 2
    (8, "cuda", "table_row_wise", 4, True),   # 2 hosts x 4
]


@pytest.mark.parametrize("world,device,sharding,local,splits", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" + (f"-{c[0] // c[3]}x{c[3]}" if c[3] else "") for c in CASES])
def test_planner_splits_mixed_and_pure_and_make_plan_mirrors_them(world, device, sharding, local, splits):
    model = _model(device)
    raw, _ = planner_plan(model, world, device, sharding, 64, local_world_size=local)
    # TorchRec balances pure_tgt onto other ranks than mixed_tgt: the repair below is needed
    assert bool(_split_tables(raw)) == splits, _split_tables(raw)
    plan = make_plan(model, world, device, sharding, 64, local_world_size=local)
    assert _split_tables(plan) == []
    check_mirrored(plan)
    mixed = plan.plan["mixed_tgt"]
    assert set(mixed) == set(plan.plan["pure_tgt"]) == {c.name for c in model.mixed_tgt.embedding_bag_configs()}
    used = set().union(*(set(ps.ranks) for m in plan.plan.values() for ps in m.values()))
    assert used == set(range(world)), f"the plan leaves ranks {set(range(world)) - used} empty"
    if sharding == "row_wise":
        assert all(ps.ranks == list(range(world)) for ps in mixed.values())
    if sharding == "table_row_wise":  # each table's rows on the ranks of one host, all of them
        for t, ps in mixed.items():
            assert len(ps.ranks) == local and len({r // local for r in ps.ranks}) == 1, (t, ps.ranks)
    if sharding in ("row_wise", "table_row_wise"):  # row shards tile the table
        for t, ps in mixed.items():
            rows = sorted((s.shard_offsets[0], s.shard_sizes[0]) for s in ps.sharding_spec.shards)
            assert rows[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(rows, rows[1:])), (t, rows)


@pytest.mark.parametrize("sharding", ["column_wise", "table_column_wise"])
@pytest.mark.parametrize("shards", [2, 4])
def test_column_shards_cut_every_table_into_that_many_mirrored_shards(sharding, shards):
    model = _model()
    plan = make_plan(model, 4, "cpu", sharding, 64, column_shards=shards)
    assert _split_tables(plan) == []
    for mod in ("mixed_tgt", "pure_tgt", "src"):
        for t, ps in plan.plan[mod].items():
            cols = sorted((s.shard_offsets[1], s.shard_sizes[1]) for s in ps.sharding_spec.shards)
            assert ps.sharding_type == sharding
            assert cols == [(i * DIM // shards, DIM // shards) for i in range(shards)], (mod, t, cols)


def test_column_shards_that_do_not_divide_the_dim_are_refused_in_one_line():
    with pytest.raises(ValueError) as e:
        make_plan(_model(), 4, "cpu", "column_wise", 64, column_shards=3)
    msg = str(e.value)
    assert "\n" not in msg and "column_shards=3" in msg and "(dim 16)" in msg and "[1, 2, 4]" in msg, msg


def _table_wise(model, table, rank):
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise

    names = [c.name for c in model.pure_tgt.embedding_bag_configs()]
    return construct_module_sharding_plan(model.pure_tgt, {t: table_wise(rank=rank) for t in names}, local_size=4,
                                          world_size=4, device_type="cpu")[table]


def _moved_to_another_rank(model, plan, table):
    ps = plan.plan["mixed_tgt"][table]
    other = (ps.ranks[0] + 1) % 4
    plan.plan["pure_tgt"][table] = _table_wise(model, table, other)
    return f"ranks [{other}] vs {ps.ranks}"


def _other_type(model, plan, table):
    plan.plan["pure_tgt"][table] = make_plan(model, 4, "cpu", "column_wise", 64,
                                             column_shards=2).plan["mixed_tgt"][table]
    return "sharding type column_wise vs table_wise"


def _other_shard_count(model, plan, table):
    """Both column_wise over ranks 0 and 1: two 8-column shards vs four 4-column shards."""
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan

    names = [c.name for c in model.pure_tgt.embedding_bag_configs()]
    for mod, ranks in (("mixed_tgt", [0, 1]), ("pure_tgt", [0, 0, 1, 1])):
        plan.plan[mod][table] = construct_module_sharding_plan(
            getattr(model, mod), {t: column_wise(ranks=ranks) for t in names}, local_size=4, world_size=4,
            device_type="cpu")[table]
    return "shards (offsets, sizes, rank)"


@pytest.mark.parametrize("split", [_moved_to_another_rank, _other_type, _other_shard_count],
                         ids=["other-rank", "other-type", "other-shard-count"])
def test_a_plan_that_splits_mixed_and_pure_is_refused_before_sharding(split):
    """Never a silent cross-rank "copy": check_mirrored and shard() refuse, in one line naming the
    table and what differs, before DistributedModelParallel (or any collective) runs."""
    model = _model()
    plan = make_plan(model, 4, "cpu", "table_wise", 64)
    expected = split(model, plan, "t_item_id")
    with pytest.raises(UnmirroredPlanError) as e:
        check_mirrored(plan)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("table t_item_id: pure_tgt is not planned like mixed_tgt")
    assert expected in msg and "needs one plan for both" in msg, msg
    with pytest.raises(UnmirroredPlanError, match="t_item_id"):
        shard(model, plan, torch.device("cpu"))  # no process group here: refused before it is needed


def test_a_plan_missing_pure_tables_is_refused():
    model = _model()
    plan = make_plan(model, 4, "cpu", "table_wise", 64)
    del plan.plan["pure_tgt"]["t_user_id"]
    with pytest.raises(UnmirroredPlanError, match="not planned over the same tables"):
        check_mirrored(plan)
