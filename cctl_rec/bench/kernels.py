"""``cctl-rec bench kernels``: fbgemm's fused TBE vs plain PyTorch embedding bags, to show the choice.

The target domain's tables (the dataset's schema; then again with the user table grown to
``table_rows[0]`` rows) looked up on real target batches (``features_kjt``, the training batch
size), forward + backward + optimizer step, variants alternating batch by batch:

- ``fused TBE rowwise Adagrad (product)``: an EmbeddingBagCollection with the sparse optimizer
  fused into its backward (``apply_sparse_optimizer``), planned and sharded by
  DistributedModelParallel on a 1-rank gloo group, as ``train()`` does;
- ``nn.EmbeddingBag sparse + Adagrad``: one ``nn.EmbeddingBag(mode="mean", sparse=True)`` per
  table, ``torch.optim.Adagrad`` on the sparse gradients (elementwise, not rowwise);
- ``nn.EmbeddingBag sparse + SparseAdam``: the same with ``torch.optim.SparseAdam``;
- ``EBC unsharded + dense Adam``: TorchRec's EmbeddingBagCollection without DMP (plain
  ``nn.EmbeddingBag`` inside, dense gradients) and ``torch.optim.Adam`` over whole tables.

The loss is ``sum(pooled * G)`` for a fixed random G, the same for every variant.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, fmt_stat, header_md, md_table, summary,
                                   target, train_config)

logger = logging.getLogger(__name__)

PRODUCT = "fused TBE rowwise Adagrad (product)"


def _variants(schema: Any, dim: int, lr: float, batch: int) -> dict[str, Callable[[Any, Any], None]]:
    """name -> step(kjt, G): forward, loss, backward, optimizer."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torchrec import EmbeddingBagCollection

    from cctl_rec.distributed.env import init_distributed
    from cctl_rec.distributed.sharding import apply_sparse_optimizer, make_plan, shard
    from cctl_rec.modules.embedding import table_configs

    init_distributed("cpu", "gloo")
    configs = table_configs(schema, dim)

    class Tables(nn.Module):
        def __init__(self, device: torch.device) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=configs, device=device)

        def forward(self, kjt: Any) -> torch.Tensor:
            return self.ebc(kjt).values()

    out: dict[str, Callable[[Any, Any], None]] = {}
    m = Tables(torch.device("meta"))
    apply_sparse_optimizer(m, "exact_rowwise_adagrad", lr, "cpu")
    plan = make_plan(m, dist.get_world_size(), "cpu", "auto", batch, pg=dist.GroupMember.WORLD)
    dmp = shard(m, plan, torch.device("cpu"))

    def fused(kjt: Any, g: torch.Tensor) -> None:
        (dmp(kjt) * g).sum().backward()

    out[PRODUCT] = fused
    key_table = {k: c.name for c in configs for k in c.feature_names}
    for name, opt_cls in (("nn.EmbeddingBag sparse + Adagrad", torch.optim.Adagrad),
                          ("nn.EmbeddingBag sparse + SparseAdam", torch.optim.SparseAdam)):
        bags = nn.ModuleDict({c.name: nn.EmbeddingBag(c.num_embeddings, dim, mode="mean", sparse=True)
                              for c in configs})
        opt = opt_cls(list(bags.parameters()), lr=lr)

        def plain(kjt: Any, g: torch.Tensor, bags: nn.ModuleDict = bags, opt: Any = opt) -> None:
            opt.zero_grad(set_to_none=True)
            d = kjt.to_dict()
            pooled = torch.cat([bags[key_table[k]](d[k].values(), d[k].offsets()[:-1]) for k in kjt.keys()], dim=1)
            (pooled * g).sum().backward()
            opt.step()

        out[name] = plain
    ebc = Tables(torch.device("cpu"))
    adam = torch.optim.Adam(ebc.parameters(), lr=lr)

    def dense(kjt: Any, g: torch.Tensor) -> None:
        adam.zero_grad(set_to_none=True)
        (ebc(kjt) * g).sum().backward()
        adam.step()

    out["EBC unsharded + dense Adam"] = dense
    return out


def _measure(opts: BenchOptions, schema: Any, label: str) -> dict[str, Any]:
    import torch

    from cctl_rec.data.loader import Dataset
    from cctl_rec.data.reader import ParquetStream, features_kjt

    cfg = train_config(opts)
    data = Dataset(cfg.data.path)
    b = cfg.data.batch_size
    stream = ParquetStream(data.paths("tgt/train"), schema, b, cycle=True)
    it = iter(stream)
    variants = _variants(schema, cfg.model.embedding_dim, cfg.optim.sparse_lr, b)
    width = cfg.model.embedding_dim * len(schema.keys)
    g = torch.randn(b, width, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(opts.warmup + opts.repeats * opts.steps):
        kjt = features_kjt(next(it), schema, cfg.data.max_seq_len, cfg.data.long_seq)
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(kjt, g)
            if i >= opts.warmup:
                times[name].append(time.perf_counter() - t0)
    rows = sum(r for _, r, _ in schema.tables())
    res = {"tables": len(schema.tables()), "rows": rows, "features": len(schema.keys),
           "ids_per_batch": int(kjt.values().numel()), "batch": b, "variants": {}}
    for name, ts in times.items():
        res["variants"][name] = {"samples_per_s": summary([b / t for t in ts], 0),
                                 "ms_per_batch": summary([1e3 * t for t in ts], 3)}
    p = res["variants"][PRODUCT]["samples_per_s"]["median"]
    for name, v in res["variants"].items():
        v["product_speedup"] = round(p / v["samples_per_s"]["median"], 2)
    logger.info("kernels %s: %s", label, {k: v["samples_per_s"]["median"] for k, v in res["variants"].items()})
    return res


def run(opts: BenchOptions) -> tuple[dict[str, Any], str]:
    from cctl_rec.bench.sync import grown_schemas
    from cctl_rec.data.loader import Dataset

    with LoadSampler() as load:
        schemas = Dataset(train_config(opts).data.path).schemas
        res = {"dataset_tables": _measure(opts, schemas["tgt"], "dataset tables")}
        big = grown_schemas(schemas, opts.table_rows[0])["tgt"]
        if big != schemas["tgt"]:
            res[f"user_table_{opts.table_rows[0]}"] = _measure(opts, big, f"{opts.table_rows[0]:,} user rows")
    tg = []
    for k, r in res.items():
        slowest = max(v["product_speedup"] for v in r["variants"].values())
        best_other = min(v["product_speedup"] for n, v in r["variants"].items() if n != PRODUCT)
        tg.append(target(f"fused TBE vs the best plain variant ({k})", "fastest", best_other, best_other >= 1.0,
                         f"up to {slowest:.1f}x over the slowest"))
    env = envelope("kernels", opts, res, load, tg)
    return env, markdown(env)


def markdown(env: dict[str, Any]) -> str:
    lines = [header_md(env, "Embedding kernels: fused TBE vs nn.EmbeddingBag + torch optimizers")]
    for k, r in env["results"].items():
        lines += [f"## {k}: {r['tables']} tables, {r['rows']:,} rows, {r['features']} features, "
                  f"{r['ids_per_batch']:,} ids per batch of {r['batch']}", "",
                  md_table(["variant", "samples/s", "ms per batch (fwd+bwd+update)", "fused TBE is x faster"],
                           [[n, fmt_stat(v["samples_per_s"], nd=0), fmt_stat(v["ms_per_batch"], nd=2),
                             v["product_speedup"]] for n, v in r["variants"].items()]), ""]
    return "\n".join(lines)
