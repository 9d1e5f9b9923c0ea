"""Four (and eight) gloo ranks: CCTL sharded by DistributedModelParallel equals the unsharded model, forward and
one training step, for every sharding type the CPU supports (column_wise with 2 and 4 shards per
table) and the planner's auto; after a sync the pure network equals the mixed one on every rank;
a plan that puts a pure table on another rank than its mixed one is refused on every rank.

One spawn of 4 processes runs every variant (each builds its own plan and DMP), and one spawn of 8
the same variants, so the whole file costs one start-up of 4 interpreters and one of 8.
"""

import glob

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import run_distributed

pytestmark = pytest.mark.dist

WORLD = 4
LR = 0.05
VARIANTS = [("table_wise", 0), ("column_wise", 2), ("column_wise", 4), ("table_column_wise", 2),
            ("data_parallel", 0), ("auto", 0)]
OUTPUTS = ("logit_tgt", "logit_pure", "logit_src", "x_src", "ren_id_s", "ren_id_t", "ren_seq_s", "ren_seq_t")


def _batches(root, world):
    """Every rank's batch (rank r reads its own row range), built on each rank: the unsharded
    reference trains on all of them, the sharded model on its own."""
    from cctl_rec.config import DataConfig
    from cctl_rec.data.loader import build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.schema import shared_attributes, synthetic_schemas
    from tests.tinydata import N_BRAND, N_CAT, N_ITEMS, N_USERS

    schemas = synthetic_schemas(N_USERS, N_ITEMS, N_CAT, N_BRAND, n_cities=30)
    cfg = DataConfig(batch_size=16, src_ratio=2)
    shared = shared_attributes(schemas["src"], schemas["tgt"])
    out = []
    for r in range(world):
        t = next(iter(ParquetStream(sorted(glob.glob(f"{root}/tgt/train/*.parquet")), schemas["tgt"], 16, r, world)))
        s = next(iter(ParquetStream(sorted(glob.glob(f"{root}/src/train/*.parquet")), schemas["src"], 32, r, world)))
        out.append(build_batch(t, s, schemas, cfg, shared))
    return schemas, out


def _loss(out):
    """Touches every table and tower: target and source rows through the mixed network, target
    rows through the pure one, the REN embeddings."""
    return (out.logit_tgt.sum() + out.logit_src.sum() + 0.5 * out.logit_pure.sum()
            + 0.1 * (out.ren_id_s * out.ren_id_t).sum() + 0.1 * (out.ren_seq_s * out.ren_seq_t).sum())


def _variant(rank, world, schemas, batches, sharding, column_shards):
    from cctl_rec.config import ModelConfig
    from cctl_rec.distributed.sharding import DataParallelTables, apply_sparse_optimizer, make_plan, shard
    from cctl_rec.distributed.state import gather_full_state, load_full_state
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.train.sync import check_same_layout, sync_mixed_to_pure

    cfg = ModelConfig(tower=(16, 8), san_hidden=(8,), embedding_dim=16)
    torch.manual_seed(0)
    ref = CCTL(schemas, cfg, device=torch.device("cpu"))
    with torch.no_grad():  # the towers start unequal, so the sync below has something to do
        for p in ref.pure_tower.parameters():
            p.add_(0.01)
    model = CCTL(schemas, cfg)
    apply_sparse_optimizer(model, "exact_sgd", LR, "cpu")  # SGD: every gradient scale error shows
    plan = make_plan(model, world, "cpu", sharding, 16, pg=dist.GroupMember.WORLD, column_shards=column_shards)
    dmp = shard(model, plan, torch.device("cpu"))
    m = dmp.module
    check_same_layout(m.mixed_tgt, m.pure_tgt)
    load_full_state(m, ref.state_dict())
    start = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    res = {"types": sorted({ps.sharding_type for mod in plan.plan.values() for ps in mod.values()}),
           "ranks": sorted(set().union(*(ps.ranks or range(world) for mod in plan.plan.values()
                                         for ps in mod.values()))),
           "shards": sorted({len(ps.sharding_spec.shards) if ps.sharding_spec else 0
                             for mod in plan.plan.values() for ps in mod.values()})}
    # forward on this rank's batch
    out, want = dmp(batches[rank]), ref(batches[rank])
    res["forward"] = {k: (getattr(out, k).detach(), getattr(want, k).detach()) for k in OUTPUTS}
    # one SGD step: sharded on the rank's batch (DDP / TorchRec average over ranks), the reference
    # on the mean of the ranks' losses
    dense = [p for n in ("mixed_tower", "san", "pure_tower") for p in getattr(m, n).parameters()]
    dense_opt = torch.optim.SGD(dense, lr=LR)
    dp_tables = DataParallelTables(m, "exact_sgd", LR)
    _loss(out).backward()
    dense_opt.step()
    dp_tables.step()
    ref_loss = sum(_loss(ref(b)) for b in batches) / world
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    got = gather_full_state(m)
    res["step"] = {k: (got[k], v.detach()) for k, v in ref.state_dict().items()}
    res["moved"] = sorted(k for k, v in ref.state_dict().items() if not torch.equal(v, start[k]))
    # the sync: pure = mixed on every rank, tables (all shards, gathered) and towers
    with torch.no_grad():
        res["before_sync"] = float((m.predict(batches[rank].tgt, "pure") - m.predict(batches[rank].tgt, "mixed"))
                                   .abs().max())
    sync_mixed_to_pure(m, dense_opt, optimizer_state=True, dp_tables=dp_tables)
    full = gather_full_state(m)
    res["synced"] = [(full[k], full[k.replace("mixed_", "pure_", 1)]) for k in full
                     if k.startswith(("mixed_tgt.", "mixed_tower."))]
    with torch.no_grad():
        res["after_sync"] = (m.predict(batches[rank].tgt, "pure"), m.predict(batches[rank].tgt, "mixed"))
    return res


def _split_plan(rank, world, schemas, how):
    """A plan whose pure_tgt t_item_id is placed unlike mixed_tgt's, given to DistributedModelParallel
    directly (shard() refuses it before that):

    - ``other-rank``: table_wise, the pure copy on the next rank (two ranks hold neither copy);
    - ``swapped-columns``: column_wise over ranks 0 and 1 in both, the two 8-column shards' ranks
      swapped in the pure copy: each rank holds a 120 x 8 shard of both, so ``load_state_dict``
      alone would copy columns 0-7 into columns 8-15 without a word.

    Returns what shard(), the layout check and the sync said on this rank, and the local shard
    sizes of both copies.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv

    from cctl_rec.config import ModelConfig
    from cctl_rec.distributed.sharding import UnmirroredPlanError, apply_sparse_optimizer, make_plan, shard
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.train.sync import check_same_layout, sync_mixed_to_pure

    model = CCTL(schemas, ModelConfig(tower=(16, 8), san_hidden=(8,), embedding_dim=16))
    apply_sparse_optimizer(model, "exact_sgd", LR, "cpu")
    plan = make_plan(model, world, "cpu", "table_wise", 16, pg=dist.GroupMember.WORLD)
    names = [c.name for c in model.pure_tgt.embedding_bag_configs()]

    def place(mod, gen):
        plan.plan[mod]["t_item_id"] = construct_module_sharding_plan(
            getattr(model, mod), {t: gen for t in names}, local_size=world, world_size=world,
            device_type="cpu")["t_item_id"]

    home = plan.plan["mixed_tgt"]["t_item_id"].ranks[0]
    if how == "other-rank":
        place("pure_tgt", table_wise(rank=(home + 1) % world))
    else:
        place("mixed_tgt", column_wise(ranks=[0, 1]))
        place("pure_tgt", column_wise(ranks=[1, 0]))
    said = {}
    try:
        shard(model, plan, torch.device("cpu"))
    except UnmirroredPlanError as e:
        said["shard"] = str(e)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=[EmbeddingBagCollectionSharder()],
                                   data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False))
    key = "embedding_bags.t_item_id.weight"
    local = {mod: [tuple(sh.tensor.shape) for sh in getattr(dmp.module, mod).state_dict()[key].local_shards()]
             for mod in ("mixed_tgt", "pure_tgt")}
    for what, call in (("check", lambda: check_same_layout(dmp.module.mixed_tgt, dmp.module.pure_tgt)),
                       ("sync", lambda: sync_mixed_to_pure(dmp.module, None))):
        try:
            call()
        except RuntimeError as e:
            said[what] = str(e)
    return {"home": home, "local": local, "said": said}


def _ranks(rank, world, root, variants, splits):
    schemas, batches = _batches(root, world)
    out = {v: _variant(rank, world, schemas, batches, *v) for v in variants}
    for how in splits:
        out[how] = _split_plan(rank, world, schemas, how)
    return out


@pytest.fixture(scope="module")
def four_ranks(tiny_data):
    return run_distributed(_ranks, WORLD, tiny_data, VARIANTS, ("other-rank", "swapped-columns"))


def _check_variant(results, variant, world):
    sharding, shards = variant
    for rank, all_res in enumerate(results):
        r = all_res[variant]
        if sharding != "auto":
            assert r["types"] == [sharding], r["types"]
        if shards:
            assert r["shards"] == [shards], r["shards"]
        assert r["ranks"] == list(range(world)), f"the plan leaves ranks idle: {r['ranks']}"
        for k, (got, want) in r["forward"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {k}: {m}")
        for k, (got, want) in r["step"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {k} after one step: {m}")
        moved = r["moved"]  # the step changed every table set and every dense part
        for part in ("mixed_tgt.", "pure_tgt.", "src.", "mixed_tower.", "pure_tower.", "san."):
            assert any(k.startswith(part) for k in moved), part
        assert r["before_sync"] > 0
        for a, b in r["synced"]:
            assert torch.equal(a, b)
        assert torch.equal(*r["after_sync"])


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{s}{f'-{n}shards' if n else ''}" for s, n in VARIANTS])
def test_four_ranks_sharded_forward_and_step_equal_unsharded_and_sync_equalises(four_ranks, variant):
    _check_variant(four_ranks, variant, WORLD)


EIGHT = VARIANTS


@pytest.fixture(scope="module")
def eight_ranks(tiny_data):
    """8 oversubscribed processes, one spawn for every variant: column_wise with 2 shards per table is
    48 shards of the 24 tables over 8 ranks, with 4 shards 96."""
    return run_distributed(_ranks, 8, tiny_data, EIGHT, ())


@pytest.mark.parametrize("variant", EIGHT, ids=[f"{s}{f'-{n}shards' if n else ''}" for s, n in EIGHT])
def test_eight_ranks_sharded_forward_and_step_equal_unsharded_and_sync_equalises(eight_ranks, variant):
    _check_variant(eight_ranks, variant, 8)


@pytest.mark.parametrize("how", ["other-rank", "swapped-columns"])
def test_four_ranks_refuse_a_plan_that_splits_mixed_and_pure(four_ranks, how):
    """Refused on every rank, by shard(), by the layout check and by the sync itself; never a
    silent copy between differently placed shards."""
    res = [r[how] for r in four_ranks]
    local = {rank: r["local"] for rank, r in enumerate(res) if any(r["local"].values())}
    if how == "other-rank":
        home = res[0]["home"]
        assert local == {home: {"mixed_tgt": [(120, 16)], "pure_tgt": []},
                         (home + 1) % WORLD: {"mixed_tgt": [], "pure_tgt": [(120, 16)]}}, local
    else:  # same local shapes on ranks 0 and 1: a size check alone would let the copy through
        assert local == {r: {"mixed_tgt": [(120, 8)], "pure_tgt": [(120, 8)]} for r in (0, 1)}, local
    for rank, r in enumerate(res):
        said = r["said"]
        assert said.get("shard", "").startswith("table t_item_id: pure_tgt is not planned like mixed_tgt"), said
        for what in ("check", "sync"):
            assert "table embedding_bags.t_item_id.weight are sharded differently" in said.get(what, ""), \
                (rank, what, said)
