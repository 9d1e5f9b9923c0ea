"""Dry-run sharding plans for a whole CCTL model: per-rank memory of every table CCTL trains.

The planner runs on meta-device tables (nothing is allocated, no GPU needed). The mixed and pure
target tables get one (mirrored) plan, so the per-rank totals are recomputed here from the final
plan: weights (fp32) plus the sparse optimizer's state (rowwise Adagrad: one fp32 per row and
shard; Adagrad / Adam: one / two per element).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torchrec.distributed.planner.types import PlannerError

from cctl_rec.config import ModelConfig
from cctl_rec.distributed.sharding import apply_sparse_optimizer, make_plan
from cctl_rec.models.cctl import CCTL
from cctl_rec.schema import DomainSchema
from cctl_rec.train.rundir import plan_to_json

logger = logging.getLogger(__name__)

GB = 1024 ** 3
OPT_STATE = {"exact_rowwise_adagrad": "row", "exact_adagrad": 1, "exact_sgd": 0, "adam": 2}


def plan_model(schemas: dict[str, DomainSchema], world_size: int, device: str, hbm_gb: float,
               ddr_gb: Optional[float], sharding: str, batch_size: int, dim: int = 8,
               optimizer: str = "exact_rowwise_adagrad") -> dict[str, Any]:
    """Plans CCTL's tables (mixed + pure target, source) and returns a JSON-able report."""
    model = CCTL(schemas, ModelConfig(embedding_dim=dim), with_source=True)
    apply_sparse_optimizer(model, optimizer if device == "cuda" or optimizer != "adam" else "exact_rowwise_adagrad",
                           0.01, device)
    hbm = int(hbm_gb * GB) if device == "cuda" else None
    ddr = int((ddr_gb if ddr_gb is not None else (hbm_gb if device == "cpu" else 128.0)) * GB)
    try:
        plan = make_plan(model, world_size, device, sharding, batch_size, hbm_cap=hbm, ddr_cap=ddr)
    except PlannerError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(f"the tables do not fit {world_size} x {hbm_gb if device == 'cuda' else ddr / GB:g} GB "
                         f"({device}, sharding={sharding}): {first}") from None
    per_rank = [0.0] * world_size
    tables = []
    configs = {}
    for mod_name in ("mixed_tgt", "pure_tgt", "src"):
        for c in getattr(model, mod_name).embedding_bag_configs():
            configs[(mod_name, c.name)] = c
    opt = OPT_STATE[optimizer]
    for mod_name, mod_plan in plan.plan.items():
        for t, ps in mod_plan.items():
            c = configs[(mod_name, t)]
            shards = [(s.shard_sizes, s.placement.rank()) for s in (ps.sharding_spec.shards if ps.sharding_spec else [])]
            if not shards:  # data_parallel: a full replica on every rank
                shards = [([c.num_embeddings, c.embedding_dim], r) for r in range(world_size)]
            for (rows, cols), r in shards:
                extra = rows if opt == "row" else rows * cols * opt
                per_rank[r] += 4.0 * (rows * cols + extra)
            tables.append({"module": mod_name, "table": t, "rows": c.num_embeddings, "dim": c.embedding_dim,
                           "sharding": ps.sharding_type, "kernel": ps.compute_kernel,
                           "ranks": sorted({r for _, r in shards}),
                           "gb": 4.0 * c.num_embeddings * c.embedding_dim / GB})
    uvm = sorted({f"{t['module']}.{t['table']}" for t in tables if "uvm" in t["kernel"]})
    return {"world_size": world_size, "device": device, "hbm_gb_per_rank": hbm_gb if device == "cuda" else None,
            "ddr_gb_per_rank": ddr / GB, "sharding": sharding, "batch_size": batch_size, "optimizer": optimizer,
            "per_rank_gb": [x / GB for x in per_rank], "peak_gb": max(per_rank) / GB,
            "fits": True, "uvm_tables": uvm, "total_gb": sum(per_rank) / GB,
            "tables": tables, "plan": plan_to_json(plan), "plan_text": str(plan)}
