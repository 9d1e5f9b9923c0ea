"""Sharded (DistributedModelParallel over 2 gloo ranks) == unsharded, for an EBC and for CCTL."""

import glob

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from tests.dist_harness import run_distributed

pytestmark = pytest.mark.dist


def _ebc(device):
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=50, feature_names=[f"f{i}"],
                                 pooling=PoolingType.MEAN) for i in range(3)]
    return EmbeddingBagCollection(tables=tables, device=device)


def _global_kjt():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (3 * 8,), generator=g)  # 3 keys x 8 samples
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1", "f2"], values=values, lengths=lengths)


def _slice(kjt, lo, hi):
    d = kjt.to_dict()
    vals, lens = [], []
    for k in kjt.keys():
        jt = d[k]
        off = jt.offsets()
        vals.append(jt.values()[off[lo]:off[hi]])
        lens.append(jt.lengths()[lo:hi])
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.cat(vals), lengths=torch.cat(lens))


def _ordered(kt):
    d = kt.to_dict()
    return torch.cat([d[k] for k in ("f0", "f1", "f2")], dim=1)


def _ebc_rank(rank, world, sharding):
    from cctl_rec.distributed.sharding import DataParallelTables, make_plan, shard
    from cctl_rec.distributed.state import gather_full_state, load_full_state
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    torch.manual_seed(0)
    ref = _ebc(torch.device("cpu"))
    model = _ebc(torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.5})
    plan = make_plan(model, world, "cpu", sharding, batch_size=4, pg=dist.GroupMember.WORLD)
    dmp = shard(model, plan, torch.device("cpu"))
    load_full_state(dmp.module, ref.state_dict())
    kjt = _global_kjt()
    local = _slice(kjt, rank * 4, rank * 4 + 4)
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(2))
    out = _ordered(dmp(local))
    (out * w[rank * 4: rank * 4 + 4]).sum().backward()
    DataParallelTables(dmp.module, "exact_sgd", 0.5).step()
    after = gather_full_state(dmp.module)
    # reference: the mean over ranks of the per-rank losses (TorchRec averages sharded table
    # gradients over ranks, as DDP does for dense ones), one SGD step
    ref_out = _ordered(ref(kjt))
    ((ref_out * w).sum() / world).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    types = sorted({ps.sharding_type for m in plan.plan.values() for ps in m.values()})
    return {"out": out.detach(), "ref_out": ref_out[rank * 4: rank * 4 + 4].detach(), "after": after,
            "ref_after": {k: v.detach() for k, v in ref.state_dict().items()}, "types": types}


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_ebc_sharded_equals_unsharded(sharding):
    for res in run_distributed(_ebc_rank, 2, sharding):
        assert res["types"] == [sharding]
        torch.testing.assert_close(res["out"], res["ref_out"])
        for k in res["ref_after"]:
            torch.testing.assert_close(res["after"][k], res["ref_after"][k], msg=f"{k} after one step")


def _tiny_batch(root, rank, world, with_src=True):
    from cctl_rec.config import DataConfig
    from cctl_rec.data.loader import build_batch
    from cctl_rec.data.reader import ParquetStream
    from tests.tinydata import N_BRAND, N_CAT, N_ITEMS, N_USERS
    from cctl_rec.schema import shared_attributes, synthetic_schemas

    schemas = synthetic_schemas(N_USERS, N_ITEMS, N_CAT, N_BRAND, n_cities=30)
    cfg = DataConfig(batch_size=32, src_ratio=2)
    t = next(iter(ParquetStream(sorted(glob.glob(f"{root}/tgt/train/*.parquet")), schemas["tgt"], 32, rank, world)))
    s = next(iter(ParquetStream(sorted(glob.glob(f"{root}/src/train/*.parquet")), schemas["src"], 64, rank, world)))
    shared = shared_attributes(schemas["src"], schemas["tgt"])
    return schemas, build_batch(t, s if with_src else None, schemas, cfg, shared)


def _cctl_rank(rank, world, root, sharding):
    from cctl_rec.config import ModelConfig
    from cctl_rec.distributed.sharding import apply_sparse_optimizer, make_plan, shard
    from cctl_rec.distributed.state import load_full_state
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.train.sync import check_same_layout, sync_mixed_to_pure

    schemas, batch = _tiny_batch(root, rank, world)
    cfg = ModelConfig(tower=(16, 8), san_hidden=(8,))
    torch.manual_seed(0)
    ref = CCTL(schemas, cfg, device=torch.device("cpu"))
    model = CCTL(schemas, cfg)
    apply_sparse_optimizer(model, "exact_rowwise_adagrad", 0.1, "cpu")
    plan = make_plan(model, world, "cpu", sharding, 32, pg=dist.GroupMember.WORLD)
    dmp = shard(model, plan, torch.device("cpu"))
    m = dmp.module
    check_same_layout(m.mixed_tgt, m.pure_tgt)
    load_full_state(m, ref.state_dict())
    out, want = dmp(batch), ref(batch)
    res = {k: (getattr(out, k).detach(), getattr(want, k).detach())
           for k in ("logit_tgt", "logit_pure", "logit_src", "x_src", "ren_id_s", "ren_id_t", "ren_seq_s", "ren_seq_t")}
    # one step moves the mixed network away from the pure one; the sync brings them together
    opt = torch.optim.Adam([p for n in ("mixed_tower", "san", "pure_tower") for p in getattr(m, n).parameters()])
    (out.logit_tgt.sum() + out.logit_src.sum() + 0.5 * out.logit_pure.sum()).backward()
    opt.step()
    with torch.no_grad():
        before = (m.predict(batch.tgt, "pure") - m.predict(batch.tgt, "mixed")).abs().max()
    sync_mixed_to_pure(m, opt, optimizer_state=True)
    with torch.no_grad():
        after_p, after_m = m.predict(batch.tgt, "pure"), m.predict(batch.tgt, "mixed")
    fm = m.mixed_tgt.fused_optimizer.state_dict()["state"]
    fp = m.pure_tgt.fused_optimizer.state_dict()["state"]
    def local(x):
        return [s.tensor.clone() for s in x.local_shards()] if hasattr(x, "local_shards") else [x.clone()]
    states = [(local(fm[k][sk]), local(fp[k][sk])) for k in fm for sk in fm[k] if torch.is_tensor(fm[k][sk]) or
              hasattr(fm[k][sk], "local_shards")]
    return {"res": res, "before": float(before), "after": (after_p, after_m), "states": states}


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_cctl_sharded_forward_equals_unsharded_and_sync_equalises(tiny_data, sharding):
    for r in run_distributed(_cctl_rank, 2, tiny_data, sharding):
        for k, (got, want) in r["res"].items():
            torch.testing.assert_close(got, want, msg=f"{k} sharded vs unsharded", rtol=1e-5, atol=1e-6)
        assert r["before"] > 0
        torch.testing.assert_close(r["after"][0], r["after"][1], rtol=0, atol=0)
        assert r["states"], "the fused optimizer exposes no state"
        for a, b in r["states"]:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def _dp_sync_rank(rank, world, root):
    from cctl_rec.config import ModelConfig
    from cctl_rec.distributed.sharding import DataParallelTables, apply_sparse_optimizer, make_plan, shard
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.train.sync import sync_mixed_to_pure

    schemas, batch = _tiny_batch(root, rank, world)
    torch.manual_seed(0)
    model = CCTL(schemas, ModelConfig(tower=(16, 8), san_hidden=(8,)))
    apply_sparse_optimizer(model, "exact_rowwise_adagrad", 0.1, "cpu")
    plan = make_plan(model, world, "cpu", "data_parallel", 32, pg=dist.GroupMember.WORLD)
    dmp = shard(model, plan, torch.device("cpu"))
    m = dmp.module
    dp = DataParallelTables(m, "exact_rowwise_adagrad", 0.1)
    out = dmp(batch)
    (out.logit_tgt.sum() + out.logit_src.sum() + 0.5 * out.logit_pure.sum()).backward()
    dp.step()

    pairs = [(p, dp.params["pure_tgt" + n[len("mixed_tgt"):]]) for n, p in dp.params.items()
             if n.startswith("mixed_tgt.")]

    def states():  # (mixed, pure) optimizer state of each target table
        return [tuple({k: torch.as_tensor(v).clone() for k, v in dp.opt.state[q].items()} for q in pq) for pq in pairs]

    before = states()
    sync_mixed_to_pure(m, None, optimizer_state=True, dp_tables=dp)
    shared = [dp.opt.state[a][k].data_ptr() == dp.opt.state[b][k].data_ptr()
              for a, b in pairs for k in dp.opt.state[a] if torch.is_tensor(dp.opt.state[a][k])]
    return {"before": before, "after": states(), "shared": shared}


def test_sync_copies_the_data_parallel_tables_optimizer_state(tiny_data):
    """data_parallel tables train outside the fused TBE optimizer (DataParallelTables): the sync
    gives the pure target tables the mixed ones' row-wise Adagrad state, as copies (before it the
    two differ: the tables saw different gradients)."""
    for r in run_distributed(_dp_sync_rank, 2, tiny_data):
        assert r["before"] and any(not torch.equal(a[k], b[k]) for a, b in r["before"] for k in a)
        for a, b in r["after"]:
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        assert r["shared"] and not any(r["shared"])
