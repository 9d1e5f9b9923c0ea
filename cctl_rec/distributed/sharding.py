"""Sharding CCTL's tables with TorchRec's planner and DistributedModelParallel.

- The sparse optimizer is fused into fbgemm's TBE (``apply_optimizer_in_backward`` before DMP);
  fbgemm's CPU TBE has no Adam.
- On CPU the planner may only use data_parallel, table_wise, column_wise, table_column_wise;
  row_wise / table_row_wise need CUDA and are refused with a clear message.
- The mixed and pure target tables get ONE plan (the mixed one's, mirrored), so the k-step sync
  is a shard-local copy; :func:`mirror_plan` enforces it and fails loudly otherwise.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cctl_rec.distributed.env import allreduce_mean_

logger = logging.getLogger(__name__)

CPU_SHARDING = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
GPU_SHARDING = CPU_SHARDING + ("row_wise", "table_row_wise")


def sharding_types(requested: str, device_type: str) -> list[str]:
    """The sharding types the planner may use for ``requested`` on ``device_type``."""
    allowed = GPU_SHARDING if device_type == "cuda" else CPU_SHARDING
    if requested == "auto":
        return list(allowed)
    if requested not in GPU_SHARDING:
        raise ValueError(f"dist.sharding={requested!r} is not a sharding type; expected auto or one of "
                         f"{list(GPU_SHARDING)}")
    if requested not in allowed:
        raise ValueError(f"dist.sharding={requested} needs CUDA (fbgemm's CPU kernels do not support it); "
                         f"on CPU use one of {list(CPU_SHARDING)}")
    return [requested]


def apply_sparse_optimizer(model: nn.Module, name: str, lr: float, device_type: str) -> None:
    """Fuses the sparse optimizer into every EmbeddingBagCollection's backward (TBE)."""
    if name == "adam" and device_type != "cuda":
        raise ValueError("optim.sparse_optimizer=adam is not supported by fbgemm's CPU TBE; "
                         "use exact_rowwise_adagrad (default) on CPU")
    cls, kwargs = {
        "exact_rowwise_adagrad": (RowWiseAdagrad, {"lr": lr}),
        "exact_adagrad": (torch.optim.Adagrad, {"lr": lr}),
        "exact_sgd": (torch.optim.SGD, {"lr": lr}),
        "adam": (torch.optim.Adam, {"lr": lr}),
    }[name]
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            apply_optimizer_in_backward(cls, m.parameters(), kwargs)


def table_names(model: nn.Module) -> list[str]:
    names = []
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            names += [c.name for c in m.embedding_bag_configs()]
    return sorted(set(names))


def mirror_plan(plan: ShardingPlan, src: str = "mixed_tgt", dst: str = "pure_tgt") -> ShardingPlan:
    """Gives ``dst`` exactly ``src``'s per-table sharding (ranks, type, shard offsets)."""
    if src in plan.plan:
        if dst not in plan.plan:
            raise RuntimeError(f"the sharding plan has {src} but not {dst}")
        plan.plan[dst] = copy.deepcopy(plan.plan[src])
    return plan


def _shard_layout(ps: Any) -> list[tuple[tuple[int, ...], tuple[int, ...], Optional[int]]]:
    """(offsets, sizes, rank) of every shard of one table's ParameterSharding (none: data_parallel)."""
    spec = ps.sharding_spec
    return [(tuple(s.shard_offsets), tuple(s.shard_sizes), s.placement.rank() if s.placement else None)
            for s in (spec.shards if spec is not None else [])]


class UnmirroredPlanError(RuntimeError):
    """A plan places a mixed target table and its pure mirror differently (ranks, type or shards)."""


def check_mirrored(plan: ShardingPlan, a: str = "mixed_tgt", b: str = "pure_tgt") -> None:
    """Raises :class:`UnmirroredPlanError` (one line) unless every table of ``b`` is sharded exactly
    like the same table of ``a``: sharding type, compute kernel, ranks, and each shard's offsets,
    sizes and rank. Anything else would turn the k-step sync into a cross-rank copy."""
    if a not in plan.plan:
        return
    pa_, pb = plan.plan[a], plan.plan.get(b)
    if pb is None or set(pa_.keys()) != set(pb.keys()):
        raise UnmirroredPlanError(f"{a} and {b} are not planned over the same tables: {sorted(pa_)} vs "
                                  f"{sorted(pb or {})}")
    for t in sorted(pa_):
        x, y = pa_[t], pb[t]
        what = ("sharding type", x.sharding_type, y.sharding_type) if x.sharding_type != y.sharding_type else \
            ("ranks", sorted(set(x.ranks or [])), sorted(set(y.ranks or []))) \
            if sorted(set(x.ranks or [])) != sorted(set(y.ranks or [])) else \
            ("shards (offsets, sizes, rank)", _shard_layout(x), _shard_layout(y)) \
            if _shard_layout(x) != _shard_layout(y) else \
            ("compute kernel", x.compute_kernel, y.compute_kernel) if x.compute_kernel != y.compute_kernel else None
        if what is not None:
            raise UnmirroredPlanError(
                f"table {t}: {b} is not planned like {a} ({what[0]} {what[2]} vs {what[1]}); the k-step sync "
                f"copies shard by shard on each rank and needs one plan for both: give {b} {a}'s plan "
                f"(make_plan / mirror_plan does)")


def make_plan(model: nn.Module, world_size: int, device_type: str, sharding: str, batch_size: int,
              pg: Optional[dist.ProcessGroup] = None, hbm_cap: Optional[int] = None,
              ddr_cap: Optional[int] = None, *, local_world_size: Optional[int] = None,
              column_shards: int = 0) -> ShardingPlan:
    """Runs TorchRec's planner on ``model`` (built on meta) and mirrors mixed -> pure."""
    return run_planner(model, world_size, device_type, sharding, batch_size, pg, hbm_cap, ddr_cap,
                       local_world_size=local_world_size, column_shards=column_shards)[0]


def run_planner(model: nn.Module, world_size: int, device_type: str, sharding: str, batch_size: int,
                pg: Optional[dist.ProcessGroup] = None, hbm_cap: Optional[int] = None,
                ddr_cap: Optional[int] = None, *, local_world_size: Optional[int] = None,
                column_shards: int = 0) -> tuple[ShardingPlan, list[ShardingOption]]:
    """:func:`make_plan`, also returning the planner's chosen options (one per table, with each
    shard's estimated storage and perf; none when ``pg`` is given: rank 0 plans, all get the plan).

    ``local_world_size``: ranks per host (table_row_wise keeps a table's rows on one host; default
    ``world_size``, one host). ``column_shards``: under column_wise / table_column_wise, split each
    table into this many column shards (0: TorchRec's default, 128-column shards, so one shard for
    tables narrower than 256).

    TorchRec's planner places ``pure_tgt`` on its own, but the sync needs it on ``mixed_tgt``'s
    ranks. On CUDA the mirrored placement is checked against each rank's HBM with the planner's
    own estimates; with ``sharding="auto"`` the target tables of an overfull rank are re-planned
    row-wise (largest first) until it fits; otherwise :class:`MirroredPlanError` names the rank.
    """
    if device_type == "cuda" and hbm_cap is None and torch.cuda.is_available():
        hbm_cap = torch.cuda.get_device_properties(0).total_memory

    def solve() -> tuple[ShardingPlan, list[ShardingOption]]:
        forced: dict[str, list[str]] = {}
        while True:
            plan, options = _plan_once(model, world_size, device_type, sharding, batch_size, hbm_cap, ddr_cap,
                                       forced, local_world_size, column_shards)
            over = mirrored_overflow(options, world_size, hbm_cap) if device_type == "cuda" else None
            if over is None:
                return plan, options
            rank, need, usable, on_rank = over
            free = [name.split(".", 1)[1] for _, name in on_rank
                    if name.startswith("mixed_tgt.") and name.split(".", 1)[1] not in forced]
            if sharding != "auto" or not free:
                top = ", ".join(f"{n} {b / 1024 ** 3:.2f} GB" for b, n in on_rank[:3])
                raise MirroredPlanError(
                    f"the tables do not fit {world_size} x {hbm_cap / 1024 ** 3:g} GB ({device_type}, sharding="
                    f"{sharding}) once pure_tgt is placed like mixed_tgt (the k-step sync needs it): rank {rank} "
                    f"needs {need / 1024 ** 3:.2f} GB ({top}) of {usable / 1024 ** 3:.2f} GB usable; use "
                    f"--sharding row_wise or more HBM per rank")
            forced[free[0]] = ["row_wise", "table_row_wise"]
            logger.info("auto: %s does not fit mirrored on rank %d; planning it row-wise", free[0], rank)

    if pg is not None:
        from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result

        return invoke_on_rank_and_broadcast_result(pg, 0, lambda: solve()[0]), []
    return solve()


class MirroredPlanError(ValueError):
    """The planner's placement fits, but not once pure_tgt sits on mixed_tgt's ranks."""


PLANNER_RESERVED = 0.15  # TorchRec's default HeuristicalStorageReservation share of each rank's HBM


def mirrored_shards(options: list[ShardingOption]) -> Iterator[tuple[str, ShardingOption, Any]]:
    """(module, option, shard) of every placed shard of the final plan: pure_tgt's shards are
    mixed_tgt's (the mirror), whatever the planner chose for pure_tgt on its own."""
    for so in options:
        if so.path == "pure_tgt":
            continue
        for mod in ("mixed_tgt", "pure_tgt") if so.path == "mixed_tgt" else (so.path,):
            for sh in so.shards:
                if sh.rank is not None:
                    yield mod, so, sh


def mirrored_overflow(options: list[ShardingOption], world_size: int, hbm_cap: Optional[int]
                      ) -> Optional[tuple[int, int, float, list[tuple[int, str]]]]:
    """(rank, bytes needed, bytes usable, [(bytes, table) on that rank, largest first]) of the
    fullest rank when pure_tgt's shards are placed like mixed_tgt's and it exceeds the usable HBM;
    None when every rank fits."""
    if not hbm_cap or not options:
        return None
    hbm = [0] * world_size
    where: list[list[tuple[int, str]]] = [[] for _ in range(world_size)]
    for mod, so, sh in mirrored_shards(options):
        if sh.storage is not None:
            hbm[sh.rank] += sh.storage.hbm
            where[sh.rank].append((sh.storage.hbm, f"{mod}.{so.name}"))
    usable = (1 - PLANNER_RESERVED) * hbm_cap
    worst = max(range(world_size), key=lambda r: hbm[r])
    if hbm[worst] <= usable:
        return None
    return worst, hbm[worst], usable, sorted(where[worst], reverse=True)


def table_dims(model: nn.Module) -> dict[str, int]:
    """Table name -> embedding dim of every EmbeddingBagCollection table of ``model``."""
    return {c.name: c.embedding_dim for m in model.modules() if isinstance(m, EmbeddingBagCollection)
            for c in m.embedding_bag_configs()}


def column_shard_width(dim: int, column_shards: int, table: str) -> Optional[int]:
    """The planner's ``min_partition`` that cuts a ``dim``-wide table into ``column_shards`` shards
    (TorchRec's column shards are a multiple of 4 columns wide); None for 0 (TorchRec's default)."""
    if column_shards == 0:
        return None
    width, rest = divmod(dim, column_shards)
    if column_shards < 0 or rest or width % 4:
        raise ValueError(f"column_shards={column_shards} cannot split table {table} (dim {dim}): expected a count "
                         f"that divides the dim into shards a multiple of 4 columns wide, e.g. "
                         f"{[n for n in range(1, dim // 4 + 1) if dim % n == 0 and (dim // n) % 4 == 0]}")
    return width


def planner_plan(model: nn.Module, world_size: int, device_type: str, sharding: str, batch_size: int,
                 hbm_cap: Optional[int] = None, ddr_cap: Optional[int] = None,
                 forced: Optional[dict[str, list[str]]] = None, local_world_size: Optional[int] = None,
                 column_shards: int = 0) -> tuple[ShardingPlan, list[ShardingOption]]:
    """TorchRec's own plan, before the mirror: the planner places ``pure_tgt`` independently of
    ``mixed_tgt`` (it balances them onto different ranks whenever it can). Constraints are keyed by
    table name, so both modules get the same ones."""
    types = sharding_types(sharding, device_type)
    forced = forced or {}
    constraints = {t: ParameterConstraints(sharding_types=forced.get(t, types),
                                           min_partition=column_shard_width(d, column_shards, t))
                   for t, d in sorted(table_dims(model).items())}
    topology = Topology(world_size=world_size, compute_device=device_type, hbm_cap=hbm_cap, ddr_cap=ddr_cap,
                        local_world_size=local_world_size)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    plan = planner.plan(model, [EmbeddingBagCollectionSharder()])
    return plan, list(planner._best_plan or [])  # no public accessor in TorchRec 1.8


def _plan_once(model: nn.Module, world_size: int, device_type: str, sharding: str, batch_size: int,
               hbm_cap: Optional[int], ddr_cap: Optional[int], forced: dict[str, list[str]],
               local_world_size: Optional[int] = None, column_shards: int = 0
               ) -> tuple[ShardingPlan, list[ShardingOption]]:
    plan, options = planner_plan(model, world_size, device_type, sharding, batch_size, hbm_cap, ddr_cap, forced,
                                 local_world_size, column_shards)
    plan = mirror_plan(plan)
    check_mirrored(plan)
    return plan, options


def shard(model: nn.Module, plan: ShardingPlan, device: torch.device) -> DistributedModelParallel:
    """DistributedModelParallel over the default group; dense parts go to DDP.

    Raises:
        UnmirroredPlanError: ``plan`` places a pure target table unlike its mixed one (checked
            before anything is sharded, the same on every rank).
    """
    check_mirrored(plan)
    tables = {path: m.embedding_bag_configs() for path, m in model.named_modules()
              if isinstance(m, EmbeddingBagCollection)}
    seed = torch.initial_seed()
    env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=env, device=device, plan=plan,
                                   sharders=[EmbeddingBagCollectionSharder()],
                                   data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False))
    init_tables(dmp.module, tables, seed)
    return dmp


INIT_CHUNK_ROWS = 1 << 16


def _chunk_seed(seed: int, path: str, table: str, chunk: int) -> int:
    import hashlib

    h = hashlib.sha256(f"{seed}/{path}/{table}/{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_tables(module: nn.Module, tables: dict[str, list[Any]], seed: int) -> None:
    """Draws every embedding table of the sharded ``module`` the same way whatever the plan.

    TorchRec materialises each rank's shards from that rank's random stream, so one seed gave other
    initial tables at another world size or sharding type (all 24 tables differed between 1 and 2
    table_wise ranks). Here row chunk ``c`` (``INIT_CHUNK_ROWS`` rows, full width) of table ``t`` of
    module ``path`` is drawn uniform(TorchRec's init min, max) from a generator seeded by
    ``(seed, path, t, c)``, and each rank keeps the rows and columns of its own shards: the initial
    tables are a function of the seed alone.

    Args:
        module: the DMP-wrapped module (``dmp.module``).
        tables: module path -> its EmbeddingBagConfigs (read before sharding).
        seed: the run's seed (``torch.initial_seed()`` when the model was built).
    """
    for path, configs in tables.items():
        state = (module.get_submodule(path) if path else module).state_dict()
        for c in configs:
            t = state[f"embedding_bags.{c.name}.weight"]
            parts = ([(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in t.local_shards()]
                     if hasattr(t, "local_shards") else [(t, [0, 0], list(t.shape))])
            lo, hi = c.get_weight_init_min(), c.get_weight_init_max()
            for dst, (r0, c0), (nr, nc) in parts:
                if dst.numel() == 0:
                    continue
                for chunk in range(r0 // INIT_CHUNK_ROWS, (r0 + nr - 1) // INIT_CHUNK_ROWS + 1):
                    a = chunk * INIT_CHUNK_ROWS
                    rows = min(INIT_CHUNK_ROWS, c.num_embeddings - a)
                    g = torch.Generator(device=dst.device).manual_seed(_chunk_seed(seed, path, c.name, chunk))
                    w = torch.empty(rows, c.embedding_dim, device=dst.device, dtype=dst.dtype).uniform_(lo, hi,
                                                                                                          generator=g)
                    s, e = max(a, r0), min(a + rows, r0 + nr)
                    dst[s - r0:e - r0].copy_(w[s - a:e - a, c0:c0 + nc])


class DataParallelTables:
    """The optimizer of data_parallel tables.

    TorchRec 1.8 on CPU leaves data_parallel table weights without their in-backward (fused)
    optimizer and outside DDP: their gradients would never be applied. This keeps them trained
    like DDP parameters: gradients averaged over ranks, then the sparse optimizer's rule.

    Args:
        module: the DMP-wrapped module (``dmp.module``).
        name, lr: the sparse optimizer (``optim.sparse_optimizer``) and its learning rate.
    """

    def __init__(self, module: nn.Module, name: str, lr: float) -> None:
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        self.params: dict[str, nn.Parameter] = {}
        for mname, m in module.named_modules():
            if isinstance(m, ShardedEmbeddingBagCollection):
                for pname, p in m.named_parameters():
                    if not hasattr(p, "_in_backward_optimizers") and p.numel() > 0:
                        self.params[f"{mname}.{pname}"] = p
        cls = {"exact_rowwise_adagrad": RowWiseAdagrad, "exact_adagrad": torch.optim.Adagrad,
               "exact_sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
        self.opt = cls(list(self.params.values()), lr=lr) if self.params else None

    def step(self) -> None:
        if self.opt is None:
            return
        allreduce_mean_([p.grad for p in self.params.values() if p.grad is not None])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def copy_state(self, src_prefix: str, dst_prefix: str) -> None:
        """Optimizer state of ``src_prefix.*`` tables -> ``dst_prefix.*`` (the SCN sync)."""
        if self.opt is None:
            return
        for name, p in self.params.items():
            if name.startswith(src_prefix + "."):
                q = self.params.get(dst_prefix + name[len(src_prefix):])
                if q is not None and p in self.opt.state:
                    self.opt.state[q] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                         for k, v in self.opt.state[p].items()}
