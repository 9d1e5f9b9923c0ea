"""``cctl-rec train``: a run, top to bottom.

Build the trainer (:class:`~cctl_rec.train.trainer.Trainer`: model, plan, optimizers, IFN), write
the run directory's config and plan, resume from its newest checkpoint, then step: each step is
:meth:`Trainer.step` (forward, selector, losses, reward, backward, selector update, the sync every k
steps); every ``run.log_every`` steps a log line, every ``run.checkpoint_every`` a checkpoint. The
run ends with the last sync, so the pure network is the one served, then its last checkpoint,
the evaluation on the target's valid and test splits and ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from cctl_rec import __version__
from cctl_rec.config import TrainConfig, dump_yaml
from cctl_rec.data.loader import Dataset, split_source
from cctl_rec.data.reader import ParquetStream, dense_values, features, make_kjt
from cctl_rec.distributed.env import gather_cat
from cctl_rec.logging_utils import attach_run_log, detach_run_log, progress, upload_run_log
from cctl_rec.metrics import WindowMetrics, fmt, harmful_auc, selector_stats
from cctl_rec.models.cctl import CCTL
from cctl_rec.train.ifn import IFN
from cctl_rec.data.manifest import atomic_write_bytes
from cctl_rec.train.evaluation import evaluate  # noqa: F401  (also imported from here)
from cctl_rec.train.best import better, best_so_far, keep_best, read_best
from cctl_rec.train.checkpoint import list_checkpoints, load_checkpoint, run_fingerprint, save_checkpoint
from cctl_rec.distributed.plan_report import plan_to_json
from cctl_rec.train.rundir import (atomic_write_json, atomic_write_text, prepare_run_dir, tensorboard_writer,
                                   upload_tensorboard)
from cctl_rec.train.runlog import RunLog
from cctl_rec.train.trainer import Trainer

logger = logging.getLogger(__name__)

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
        x = module.score_source(make_kjt(list(own), [own], [len(r)]), shared_kjt, len(r), dense_values(r, ss))
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


def train(cfg: TrainConfig, run_dir: str) -> dict[str, Any]:
    """Trains CCTL (or the target-only DNN) and returns the metrics written to metrics.json."""
    t = Trainer(cfg)
    rank, world, data, module, ifn = t.rank, t.world, t.data, t.module, t.ifn
    if rank == 0:
        prepare_run_dir(run_dir)
        atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_yaml(cfg))
        atomic_write_json(os.path.join(run_dir, "plan.json"), plan_to_json(t.plan))
        atomic_write_text(os.path.join(run_dir, "plan.txt"), str(t.plan) + "\n\n" + "\n".join(t.planner_stats) + "\n")
    if world > 1:  # rank 0 made the run directory; then every rank logs into it
        dist.barrier()
    attach_run_log(run_dir)
    logger.info("cctl-rec %s, rank %d of %d, run directory %s", __version__, rank, world, run_dir)

    # --- resume from the newest complete checkpoint of this run directory
    fingerprint = run_fingerprint(cfg, data)
    start, meta = 0, {}
    ckpts = list_checkpoints(run_dir) if cfg.run.resume else []
    if ckpts:
        meta = load_checkpoint(ckpts[-1][1], t.state, fingerprint)
        # keep the rows consumed when the world size changed (same world size: same step)
        start = meta["step"] * meta["world_size"] // world
        if ifn is not None:
            ifn.load_meta(meta["ifn"])
        t.syncs = int(meta.get("syncs", 0))
        logger.info("resumed from %s at step %d", ckpts[-1][1], start)
    log = RunLog(meta, start)
    # the pure tower's CTR metrics over each log window; the window a kill cut reopens with its rows
    cut = meta.get("metric_window") if meta.get("step") == start and meta.get("world_size") == world else None
    window = WindowMetrics.restore(cut[rank] if cut else None)

    def window_meta() -> dict[str, Any]:
        """Every rank's open metric window, for trainer.json (a collective: meta() runs on every rank)."""
        states = [window.state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, window.state())
        return {"metric_window": states if any(states) else None}

    def checkpoint(at: int, final_sync: Optional[Callable[[], None]] = None) -> str:
        path = save_checkpoint(run_dir, at, t.state, lambda: {
            "fingerprint": fingerprint, "syncs": t.syncs, **log.meta(), **window_meta(), "final": at == t.total,
            "ifn": ifn.meta() if ifn is not None else None}, cfg.run.keep_checkpoints, final_sync)
        upload_tensorboard(writer, force=True)  # a run directory on a URL: staged events go up with it
        upload_run_log()  # and each rank's log
        return path

    writer = tensorboard_writer(run_dir, fresh=not ckpts) if rank == 0 else None

    # --- the steps
    total = t.total
    logger.info("training %s: %d steps of %d target (+%d source) rows per rank, %d rank(s)",
                cfg.model.name, total, cfg.data.batch_size, t.stream.src_batch if t.with_source else 0, world)
    t0 = t_last = time.perf_counter()
    step = step_last = start
    bar = progress(total=total, initial=min(start, total), disable=rank != 0, mininterval=5, desc="train", unit="step")
    best_auc = best_so_far(run_dir) if cfg.run.keep_best else None
    for step, batch in t.batches(start):
        out = t.step(batch, step)
        log.add(out.stats)
        if out.logit_pure is not None:
            window.update(out.logit_pure, batch.tgt_label)
        saved = False
        if writer and step % cfg.scn.sync_every == 0 and t.with_source:
            writer.add_scalar("scn/sync", t.syncs, step)
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == total:
            now = time.perf_counter()
            exs = (step - step_last) * cfg.data.batch_size * world / (now - t_last)
            row = log.close_window(step, {"ex_per_s": exs, **out.extra, **window.compute()})
            if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                row["valid_auc"] = evaluate(module, data, "tgt/valid", cfg, rank, world)["pure"]["auc"]
                # the last step's candidate is the served network, measured after the last sync below
                if cfg.run.keep_best and step < total and better(row["valid_auc"], best_auc):
                    best_auc, saved = row["valid_auc"], True
                    path = checkpoint(step)
                    if rank == 0:
                        keep_best(run_dir, step, best_auc, path)
                    dist.barrier()
            _log_row(row, writer, out.p, t.with_source)
            upload_tensorboard(writer)
            t_last, step_last = now, step
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < total and not saved:
            checkpoint(step)
    bar.close()
    steps = min(step, total)
    elapsed = time.perf_counter() - t0

    # --- the last sync (what is served is the pure network), then the last checkpoint
    final_sync = t.sync if t.needs_final_sync(steps) else None
    if steps > start or not ckpts:
        checkpoint(steps, final_sync)  # a longer rerun resumes from it as if it had never synced
    elif final_sync is not None:  # resumed at the end: the checkpoint is there, the pure network is not synced
        final_sync()
    valid = evaluate(module, data, "tgt/valid", cfg, rank, world)
    if cfg.run.keep_best and better(valid["pure"]["auc"], best_auc):  # the served network is the best
        best_auc = valid["pure"]["auc"]
        if rank == 0:
            keep_best(run_dir, steps, best_auc, os.path.join(run_dir, "checkpoints", f"step-{steps:08d}"))
        dist.barrier()
    test = evaluate(module, data, "tgt/test", cfg, rank, world, keep_logits=cfg.run.save_predictions)
    sel = score_source(module, ifn, data, cfg, rank, world) if ifn is not None else None
    log.reduce()
    metrics = {
        "model": cfg.model.name if not t.with_source else f"cctl/{cfg.selector.mode}",
        "steps": steps, "world_size": world, "tower": "pure",
        "target_test": test["pure"], "target_valid": valid["pure"],
        "target_test_groups": test["groups"], "target_valid_groups": valid["groups"],
        "selector": sel, "reward_mean": log.reward_sum / max(steps, 1) if t.with_source else None,
        "reward_source": cfg.scn.reward_source, "syncs": t.syncs,
        "selector_updates": ifn.rl.updates if ifn is not None and ifn.rl is not None else 0,
        "train_samples_per_s": (steps - start) * cfg.data.batch_size * world / max(elapsed, 1e-9),
        "resumed_from_step": start if ckpts else None,
        "best_checkpoint": {"step": (read_best(run_dir) or {}).get("step"), "valid_auc": best_auc}
        if cfg.run.keep_best else None,
        "train_seconds": elapsed, "data": cfg.data.path, "version": __version__,
        "history": log.history,
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
    detach_run_log()  # closed (on a URL uploaded) with the run's last line
    return metrics


CCTL_ONLY = ("loss_mixed", "loss_tgt", "loss_src", "loss_ren", "reward", "cos_id", "cos_seq", "p_mean", "p_clean",
             "p_harmful")
"""Log-row keys that only a model with a source domain has (the target-only DNN logs them as 0)."""


def _log_row(row: dict[str, Any], writer: Any, p: Optional[torch.Tensor], with_source: bool = True) -> None:
    """One grep-friendly log line, and the row (and the selector's p histogram) into TensorBoard;
    a target-only model writes none of the :data:`CCTL_ONLY` tags."""
    logger.info("step=%d loss=%.4f loss_pure=%.4f reward=%.5f p_mean=%.3f p_clean=%.3f p_harm=%.3f "
                "ren=%.4f ex/s=%.1fk auc/train=%s ne/train=%s cal/train=%s%s", row["step"], row["loss_mixed"],
                row["loss_pure"], row["reward"], row["p_mean"], row["p_clean"], row["p_harmful"], row["loss_ren"],
                row["ex_per_s"] / 1e3, fmt(row.get("train_auc")), fmt(row.get("train_ne")),
                fmt(row.get("train_calibration")), f" auc/valid={fmt(row['valid_auc'])}" if "valid_auc" in row else "")
    if writer:
        step = row["step"]
        for k, v in row.items():
            if k != "step" and v is not None and (with_source or k not in CCTL_ONLY):
                writer.add_scalar(f"train/{k}", v, step)
        if p is not None:
            writer.add_histogram("selector/p", p, step)
