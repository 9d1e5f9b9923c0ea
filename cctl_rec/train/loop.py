"""The CCTL training loop, top to bottom.

One step (per rank; B_t target rows, B_s = src_ratio * B_t source rows):

1. forward the DMP-sharded model: mixed tower on target + SAN-aligned source rows, pure tower on
   the same target rows, REN lookups;
2. the selector scores the source rows (input detached) -> weights p_i (or actions a_i);
3. Loss_mixed = mean_i p_i L_i^s + mean_j L_j^t + lambda Loss_ren (Eq. 3, 12); Loss_pure (Eq. 4);
4. one backward of Loss_mixed + Loss_pure (their parameters are disjoint); the fused TBE optimizer
   updates tables inside backward; Adam updates towers and SAN;
5. reward r = Loss_pure - Loss_tgt (Eq. 5), averaged over ranks so every selector sees one r;
6. the IFN trains the selector (REINFORCE every ``update_every`` steps in paper mode);
7. every k steps the mixed network is copied into the pure network (§2.3.5).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from cctl_rec import __version__
from cctl_rec.config import TrainConfig, dump_yaml, to_dict
from cctl_rec.data.loader import Dataset, TrainStream, heldout_batches, split_source
from cctl_rec.data.reader import ParquetStream, features, make_kjt
from cctl_rec.distributed.env import gather_cat, init_distributed
from cctl_rec.distributed.plan_report import capture_planner_stats
from cctl_rec.distributed.sharding import DataParallelTables, apply_sparse_optimizer, make_plan, shard
from cctl_rec.metrics import fmt, harmful_auc, selector_stats
from cctl_rec.models.cctl import CCTL
from cctl_rec.train.ifn import IFN, per_sample_influence
from cctl_rec.train.losses import scn_losses
from cctl_rec.data.manifest import atomic_write_bytes
from cctl_rec.data.prefetch import prefetch
from cctl_rec.train.evaluation import evaluate  # noqa: F401  (also imported from here)
from cctl_rec.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from cctl_rec.train.rundir import atomic_write_json, atomic_write_text, plan_to_json, prepare_run_dir
from cctl_rec.train.sync import check_same_layout, sync_mixed_to_pure

logger = logging.getLogger(__name__)

LOG_KEYS = ("loss_mixed", "loss_pure", "loss_tgt", "loss_src", "loss_ren", "reward", "cos_id", "cos_seq",
            "p_mean", "p_clean", "p_harmful")


def _allreduce_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def heldout_reward(module: CCTL, hb: Any) -> float:
    """Eq. 5 on a held-out target batch: Loss_pure - Loss_mixed (scn.reward_source=heldout_batch)."""
    with torch.no_grad():
        y = hb.tgt_label
        return float(F.binary_cross_entropy_with_logits(module.predict(hb.tgt, "pure"), y) -
                     F.binary_cross_entropy_with_logits(module.predict(hb.tgt, "mixed"), y))


def step_influence(module: CCTL, cfg: TrainConfig, out: Any, batch: Any, hb: Any) -> torch.Tensor:
    """The influence mode's per-source-row signal for this step (target: the step's own rows or a
    held-out batch, ``selector.influence_target``)."""
    if cfg.selector.influence_target == "heldout_batch":
        assert hb is not None
        with torch.no_grad():
            x_eval, y_eval = module.target_repr(hb.tgt, "mixed"), hb.tgt_label
    else:
        x_eval, y_eval = out.x_tgt, batch.tgt_label
    x, y = out.x_src.float(), batch.src_label
    if cfg.selector.mode == "evidence" and cfg.selector.evidence_reference == "target":
        # the step's own target rows too (B_s + B_t values): the evidence selector's reference
        x, y = torch.cat([x, out.x_tgt.detach().float()]), torch.cat([y, batch.tgt_label])
    return per_sample_influence(module.mixed_tower, x, y, x_eval.float(), y_eval, cfg.selector.influence_loss)


def step_stats(losses: Any, reward: float, p: Optional[torch.Tensor], harmful: torch.Tensor) -> dict[str, float]:
    """The logged values of one step (LOG_KEYS), averaged over ranks; ``p``: the selector's
    detached probabilities or None."""
    h = harmful
    local = [float(losses.mixed.detach()), float(losses.pure.detach()), float(losses.tgt.detach()),
             float(losses.src.detach()), float(losses.ren.detach()), reward, float(losses.cos_id),
             float(losses.cos_seq), float(p.mean()) if p is not None else 0.0,
             float(p[~h].mean()) if p is not None and (~h).any() else 0.0,
             float(p[h].mean()) if p is not None and h.any() else 0.0]
    return dict(zip(LOG_KEYS, _allreduce_mean(local)))


def _fingerprint(cfg: TrainConfig, data: Dataset) -> dict[str, str]:
    """What a checkpoint must agree on to be loaded: model, training rule, seed, data layout and
    the dataset itself (its manifest's sha256: shards, rows, checksums, schema), so a run
    directory belongs to one run."""
    import hashlib
    import json

    d = to_dict(cfg)
    return {"model": json.dumps(d["model"], sort_keys=True), "selector": json.dumps(d["selector"], sort_keys=True),
            "scn": json.dumps(d["scn"], sort_keys=True), "ren": json.dumps(d["ren"], sort_keys=True),
            "optim": json.dumps(d["optim"], sort_keys=True),
            "data": json.dumps({k: d["data"][k] for k in ("batch_size", "src_ratio", "max_seq_len", "epochs")}),
            "schema": json.dumps({k: s.to_json() for k, s in data.schemas.items()}, sort_keys=True),
            "seed": str(cfg.run.seed),
            "dataset": "manifest sha256 " + hashlib.sha256(json.dumps(data.manifest, sort_keys=True).encode()
                                                           ).hexdigest()}


@torch.no_grad()
def score_source(module: CCTL, ifn: IFN, data: Dataset, cfg: TrainConfig, rank: int, world: int,
                 rows: int = 32768) -> dict:
    """Selector statistics on the first ``rows`` source train rows (all ranks together)."""
    ss = data.schemas["src"]
    stream = ParquetStream(data.paths("src/train"), ss, cfg.data.eval_batch_size, rank, world, drop_last=False)
    ps, hs, ms, seen = [], [], [], 0
    for r in stream:
        if seen >= rows // world:
            break
        seen += len(r)
        own, as_tgt = split_source(features(r, ss, cfg.data.max_seq_len, cfg.data.long_seq), data.schemas,
                                   module.shared)
        shared_kjt = make_kjt(data.schemas["tgt"].keys, [as_tgt], [len(r)]) if module.shared else None
        x = module.score_source(make_kjt(list(own), [own], [len(r)]), shared_kjt, len(r))
        y = torch.from_numpy(r.table.column("label").to_numpy(zero_copy_only=False).astype("float32"))
        h = r.table.column("is_harmful").to_numpy(zero_copy_only=False) if "is_harmful" in r.table.column_names \
            else None
        hs.append(torch.from_numpy(h.astype(bool)) if h is not None else torch.zeros(len(r), dtype=torch.bool))
        z = module.source_logits(x)
        ms.append((2 * y - 1) * z)                     # margin: > 0 where the mixed network agrees with the label
        w, logits, actions = ifn.weights(x, hs[-1], y, z)   # the weights the run trains with
        ps.append(torch.sigmoid(logits) if actions is not None else w)  # bernoulli: p, not a draw
    p, h, margin = gather_cat(torch.cat(ps)), gather_cat(torch.cat(hs)), gather_cat(torch.cat(ms))
    out = selector_stats(p, h, data.has_harmful)
    # how well the mixed network's own margin alone ranks harmful rows last (a diagnostic, any mode)
    out["margin_harmful_auc"] = harmful_auc(margin, h) if data.has_harmful else None
    if ifn.evidence is not None:
        out["evidence_groups"] = ifn.evidence.table()
    if ifn.label_shift is not None:
        out["label_weights"] = ifn.label_shift.label_weights().tolist()
    return out


def finetune_steps(cfg: TrainConfig, total: int) -> int:
    """The Finetune baseline's source-only steps: model.finetune_steps, or model.finetune_frac of the run."""
    return cfg.model.finetune_steps or round(cfg.model.finetune_frac * total)


def total_steps(cfg: TrainConfig, stream: TrainStream) -> int:
    """Steps of the run: data.epochs passes over the target, at most run.steps."""
    total = stream.steps_per_epoch() * cfg.data.epochs
    return min(total, cfg.run.steps) if cfg.run.steps else total


def train(cfg: TrainConfig, run_dir: str) -> dict[str, Any]:
    """Trains CCTL (or the target-only DNN) and returns the metrics written to metrics.json."""
    env = init_distributed(cfg.dist.device, cfg.dist.backend)
    rank, world, device = env.rank, env.world_size, env.device
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    data = Dataset(cfg.data.path)
    if rank == 0:
        prepare_run_dir(run_dir)
        atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_yaml(cfg))
    with_source = cfg.model.name == "cctl"
    if with_source and cfg.data.src_ratio == 0:
        raise ValueError("model.name=cctl needs source rows (data.src_ratio > 0); for target only use model.name=dnn")
    if with_source and not data.has_split("src/train"):
        raise ValueError(f"model.name=cctl needs a src/train split in {cfg.data.path}")
    for split in ("tgt/train", "tgt/valid", "tgt/test"):
        if not data.has_split(split):
            raise ValueError(f"dataset {cfg.data.path} has no {split} split")
    # --- model: tables on meta, sparse optimizer fused, planned, sharded
    torch.manual_seed(cfg.run.seed)
    model = CCTL(data.schemas, cfg.model, with_source=with_source, seq_len=cfg.data.max_seq_len)
    stream = TrainStream(data, cfg.data, rank, world, with_source, model.shared, model.positions)
    apply_sparse_optimizer(model, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr, device.type)
    with capture_planner_stats() as planner_stats:
        plan = make_plan(model, world, device.type, cfg.dist.sharding, cfg.data.batch_size,
                         pg=dist.GroupMember.WORLD)
    dmp = shard(model, plan, device)
    module: CCTL = dmp.module
    if rank == 0:
        atomic_write_json(os.path.join(run_dir, "plan.json"), plan_to_json(plan))
        atomic_write_text(os.path.join(run_dir, "plan.txt"), str(plan) + "\n\n" + "\n".join(planner_stats) + "\n")
    dense = [p for name in ("mixed_tower", "san", "pure_tower", "domain_clf") if hasattr(module, name)
             for p in getattr(module, name).parameters()]
    dense_opt = torch.optim.Adam(dense, lr=cfg.optim.dense_lr)
    dp_tables = DataParallelTables(module, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr)
    torch.manual_seed(cfg.run.seed + 1000 + rank)  # per-rank randomness (Bernoulli actions)
    ifn: Optional[IFN] = None
    if with_source:
        check_same_layout(module.mixed_tgt, module.pure_tgt)
        ifn = IFN(cfg.selector, module.width, module.schemas["src"], total_steps=total_steps(cfg, stream))
        sync_mixed_to_pure(module, dense_opt, cfg.scn.sync_optimizer_state, dp_tables)  # both towers start equal

    # --- resume from the newest complete checkpoint of this run directory
    state = TrainState(dmp, dense_opt, dp_tables, ifn)
    fingerprint = _fingerprint(cfg, data)
    start, meta = 0, {}
    ckpts = list_checkpoints(run_dir) if cfg.run.resume else []
    if ckpts:
        meta = load_checkpoint(ckpts[-1][1], state, fingerprint)
        # keep the rows consumed when the world size changed (same world size: same step)
        start = meta["step"] * meta["world_size"] // world
        if ifn is not None:
            ifn.load_meta(meta["ifn"])
        logger.info("resumed from %s at step %d", ckpts[-1][1], start)
    heldout = heldout_batches(data, cfg.data, rank, world, start) if with_source and (
        cfg.scn.reward_source == "heldout_batch" or
        (cfg.selector.needs_influence and cfg.selector.influence_target == "heldout_batch")) else None

    def checkpoint(at: int) -> None:
        save_checkpoint(run_dir, at, state, {
            "fingerprint": fingerprint, "syncs": syncs, "reward_sum": reward_sum, "history": history,
            "log_window": [n_in_window, window],  # the log line a kill would cut: same history on resume
            "ifn": ifn.meta() if ifn is not None else None}, cfg.run.keep_checkpoints)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(run_dir, "tb"))

    total = total_steps(cfg, stream)
    logger.info("training %s: %d steps of %d target (+%d source) rows per rank, %d rank(s)",
                cfg.model.name, total, cfg.data.batch_size, stream.src_batch if with_source else 0, world)
    history: list[dict] = list(meta.get("history", []))
    window = {k: 0.0 for k in LOG_KEYS}
    n_in_window, t0, t_last, step_last = 0, time.perf_counter(), time.perf_counter(), start
    if meta.get("log_window") and meta["step"] == start:
        n_in_window, window = meta["log_window"][0], dict(meta["log_window"][1])
    syncs, reward_sum = int(meta.get("syncs", 0)), float(meta.get("reward_sum", 0.0))
    step = start

    def amp() -> torch.autocast:  # run.precision=bf16: the forward in bfloat16, the rest in fp32
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16")

    finetune = finetune_steps(cfg, total)
    bar = tqdm(total=total, initial=min(start, total), disable=rank != 0, mininterval=5, desc="train", unit="step")
    for batch in prefetch(stream.iterate(start), cfg.data.prefetch) if start < total else ():
        step += 1
        if step > total:
            break
        batch = batch.to(device)
        with amp():
            out = dmp(batch)
        weights = logits = actions = None
        if with_source and out.x_src is not None:
            assert ifn is not None
            weights, logits, actions = ifn.weights(out.x_src.float(), batch.src_harmful,  # selector in fp32
                                                   batch.src_label, out.logit_src)
        tgt_weight = 1.0
        if finetune and weights is not None:  # Finetune baseline: source, then target
            pre = step <= finetune
            weights, tgt_weight = torch.full_like(weights, 1.0 if pre else 0.0), 0.0 if pre else 1.0
        with amp():  # under autocast the BCE terms run in fp32; REN's inputs are the tables' fp32 outputs
            losses = scn_losses(out, batch, weights, cfg.model.loss_reduction,
                                cfg.ren.weight if cfg.ren.enabled else 0.0, cfg.model.dann_weight, tgt_weight)
        reward = float(losses.reward)
        hb = next(heldout) if heldout is not None else None
        if with_source and cfg.scn.reward_source == "heldout_batch":
            assert hb is not None
            reward = heldout_reward(module, hb)
        infl = None
        if ifn is not None and ifn.needs_influence and out.x_src is not None:
            infl = step_influence(module, cfg, out, batch, hb)

        dense_opt.zero_grad(set_to_none=True)
        (losses.mixed + losses.pure).backward()
        dense_opt.step()
        dp_tables.step()

        p = (weights.detach() if cfg.selector.mode == "evidence" else torch.sigmoid(logits.detach())) \
            if logits is not None else None
        h = batch.src_harmful
        glob = step_stats(losses, reward, p, h)
        extra = {}
        if ifn is not None and logits is not None:
            gids = ifn.groups.ids(module, batch) if ifn.groups is not None else None
            extra = ifn.step(step, logits, glob["reward"], actions, h, infl, batch.src_label, gids, out.logit_src,
                             batch.tgt_label, out.logit_tgt)
        if with_source and step % cfg.scn.sync_every == 0:
            sync_mixed_to_pure(module, dense_opt, cfg.scn.sync_optimizer_state, dp_tables)
            syncs += 1
            if writer:
                writer.add_scalar("scn/sync", syncs, step)
        reward_sum += glob["reward"]
        for k in LOG_KEYS:
            window[k] += glob[k]
        n_in_window += 1
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == total:
            now = time.perf_counter()
            avg = {k: v / n_in_window for k, v in window.items()}
            exs = (step - step_last) * cfg.data.batch_size * world / (now - t_last)
            row = {"step": step, **avg, "ex_per_s": exs, **extra}
            if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                row["valid_auc"] = evaluate(module, data, "tgt/valid", cfg, rank, world)["pure"]["auc"]
            history.append(row)
            logger.info("step=%d loss=%.4f loss_pure=%.4f reward=%.5f p_mean=%.3f p_clean=%.3f p_harm=%.3f "
                        "ren=%.4f ex/s=%.1fk%s", step, avg["loss_mixed"], avg["loss_pure"], avg["reward"],
                        avg["p_mean"], avg["p_clean"], avg["p_harmful"], avg["loss_ren"], exs / 1e3,
                        f" auc/valid={fmt(row['valid_auc'])}" if "valid_auc" in row else "")
            if writer:
                for k, v in row.items():
                    if k != "step" and v is not None:
                        writer.add_scalar(f"train/{k}", v, step)
                if p is not None:
                    writer.add_histogram("selector/p", p, step)
            window = {k: 0.0 for k in LOG_KEYS}
            n_in_window, t_last, step_last = 0, now, step
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < total:
            checkpoint(step)
    bar.close()
    steps = min(step, total)
    elapsed = time.perf_counter() - t0
    if steps > start or not ckpts:
        checkpoint(steps)  # before the final sync, so a longer rerun continues the same run

    if with_source:  # final sync: what is served is the pure network
        sync_mixed_to_pure(module, dense_opt, cfg.scn.sync_optimizer_state, dp_tables)
    valid = evaluate(module, data, "tgt/valid", cfg, rank, world)
    test = evaluate(module, data, "tgt/test", cfg, rank, world, keep_logits=cfg.run.save_predictions)
    sel = score_source(module, ifn, data, cfg, rank, world) if ifn is not None else None
    metrics = {
        "model": cfg.model.name if not with_source else f"cctl/{cfg.selector.mode}",
        "steps": steps, "world_size": world, "tower": "pure",
        "target_test": test["pure"], "target_valid": valid["pure"],
        "target_test_groups": test["groups"], "target_valid_groups": valid["groups"],
        "selector": sel, "reward_mean": reward_sum / max(steps, 1) if with_source else None,
        "reward_source": cfg.scn.reward_source, "syncs": syncs + (1 if with_source else 0),
        "selector_updates": ifn.rl.updates if ifn is not None and ifn.rl is not None else 0,
        "train_samples_per_s": (steps - start) * cfg.data.batch_size * world / max(elapsed, 1e-9),
        "resumed_from_step": start if ckpts else None,
        "train_seconds": elapsed, "data": cfg.data.path, "version": __version__,
        "history": history,
    }
    if rank == 0:
        if cfg.run.save_predictions:
            import io

            import pyarrow as pa
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(pa.table({"logit": pa.array(test["logits"].numpy())}), buf)
            atomic_write_bytes(os.path.join(run_dir, "predictions-tgt-test.parquet"), buf.getvalue())
        atomic_write_json(os.path.join(run_dir, "metrics.json"), metrics)
        if writer:
            for name, m in (("test", test), ("valid", valid)):
                if m["pure"]["auc"] is not None:  # None: one label class, AUC undefined
                    writer.add_scalar(f"eval/target_{name}_auc", m["pure"]["auc"], steps)
            writer.close()
        logger.info("done: %d steps in %.1fs; target test auc=%s logloss=%s (pure tower)%s", steps, elapsed,
                    fmt(test["pure"]["auc"]), fmt(test["pure"]["logloss"]),
                    "" if sel is None else f"; selector p_mean={sel['p_mean']:.3f} harmful_auc="
                    f"{sel['harmful_auc'] if sel['harmful_auc'] is None else round(sel['harmful_auc'], 4)}")
    dist.barrier()
    return metrics
