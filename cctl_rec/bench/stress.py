"""``cctl-rec bench stress``: a long CCTL run through many syncs and selector updates, checked.

The harness (``train()``'s model and step) trains ``stress_steps`` steps on the dataset with k
(``--sync-every``) and the selector window (``--update-every``) scaled down so at least 20 of
each happen (default: ``stress_steps / 25``). Checked while it runs — a failure makes ``cctl-rec bench
stress`` exit 1:

- every step: the logged losses and the reward are finite; the reward is Loss_pure - Loss_tgt
  (Eq. 5); the REINFORCE window's sample count N is the source rows seen since the last update;
- every selector update: the update count; the selector moved by exactly alpha * G / N, with G
  recomputed from the paper's definition, sum_k grad(sum_i log p_i)_k * r_accu_k,
  r_accu_k = sum_j gamma^j r_{k+j}, from the per-step gradients and rewards recorded during the
  window (independently of the eligibility trace the product keeps); trace, G and N reset; the
  selector's parameters finite;
- every sync: the pure network equals the mixed one (every local table shard, the towers, the
  fused optimizer state); the sync count; every table shard and tower finite;
- RSS (``/proc/self/statm``, sampled every ``rss_every`` steps right after the step, before the
  checks) may grow by less than 5% after warm-up (``stress_warmup`` steps; default the first third
  of the run, at least two windows): median of the first five samples after warm-up vs median of
  the last five. The allocators (pyarrow's mimalloc pool, glibc) keep freed pages while the data
  path's buffers settle: the Parquet reader alone grows RSS for about 1500 batches of 512 rows on
  ``small`` and then stays flat over further passes, so a short run mistakes that for growth.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from typing import Any

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, header_md, md_table, rss_mib, summary,
                                   target, train_config)
from cctl_rec.bench.train import TOP

logger = logging.getLogger(__name__)

MIN_WINDOWS = 20


def _finite_module(m: Any) -> bool:
    import torch

    from cctl_rec.bench.harness import _shards

    for v in m.state_dict().values():
        for t in _shards(v):
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
                return False
    return True


def run(opts: BenchOptions) -> tuple[dict[str, Any], str]:
    with LoadSampler() as load:
        if opts.stress_world == 1:
            res = _stress(opts)
        else:
            ranks = _spawn(opts.stress_world, opts)
            res = dict(ranks[0])
            res["failures"] = [f"rank {r['rank']}: {x}" for r in ranks for x in r["failures"]][:50]
            res["ranks"] = [{k: r[k] for k in ("rank", "checks", "rss", "syncs", "selector_updates", "step_ms",
                                               "max_update_rel_err")} for r in ranks]
            res["checks"] = {k: sum(r["checks"][k] for r in ranks) for k in ranks[0]["checks"]}
            res["max_update_rel_err"] = max(r["max_update_rel_err"] for r in ranks)
            growth = [r["rss"]["growth"] for r in ranks]
            worst = max(ranks, key=lambda r: -1.0 if r["rss"]["growth"] is None else r["rss"]["growth"])
            res["rss"] = worst["rss"] if None not in growth else next(r["rss"] for r in ranks
                                                                     if r["rss"]["growth"] is None)
            res["rss_rank"] = worst["rank"]
    syncs, updates, flat, failures = res["syncs"], res["selector_updates"], res["rss"], res["failures"]
    tg = [target("syncs", f">= {MIN_WINDOWS}", syncs, syncs >= MIN_WINDOWS, required=True),
          target("selector updates", f">= {MIN_WINDOWS}", updates, updates >= MIN_WINDOWS, required=True),
          target("RSS growth after warm-up" + (" (worst rank)" if opts.stress_world > 1 else ""), "< 5%",
                 flat["growth"], flat["growth"] is not None and flat["growth"] < 0.05,
                 f"{flat['baseline_mib']} -> {flat['end_mib']} MiB", required=True),
          target("invariants (no NaN, reward, REINFORCE, sync)", "no failure", len(failures), not failures,
                 "; ".join(failures[:3]), required=True)]
    env = envelope("stress", opts, res, load, tg)
    return env, markdown(env)


def _rank_main(rank: int, world: int, init_file: str, opts: BenchOptions, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.pop("MASTER_ADDR", None)
    import torch
    import torch.distributed as dist

    from cctl_rec.logging_utils import setup_logging

    setup_logging()
    torch.set_num_threads(max(1, opts.threads))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_stress(opts), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, opts: BenchOptions) -> list[dict[str, Any]]:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="cctl-stress-") as d:
        mp.spawn(_rank_main, args=(world, os.path.join(d, "pg"), opts, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def _stress(opts: BenchOptions) -> dict[str, Any]:
    """The checked run on this process (one rank of ``opts.stress_world``): its results, failures
    included (the ranks' own shards, tables and selector; the update against G and N summed over
    ranks, as :meth:`REINFORCE.update` applies them)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from cctl_rec.bench.harness import Harness, pure_equals_mixed

    total = opts.stress_steps
    k = opts.sync_every or max(1, total // (MIN_WINDOWS + 5))
    every = opts.update_every or max(1, total // (MIN_WINDOWS + 5))
    failures: list[str] = []

    def fail(msg: str) -> None:
        if len(failures) < 50:
            failures.append(msg)
        logger.error("stress: %s", msg)

    cfg = train_config(opts, "model.name=cctl", f"scn.sync_every={k}", f"selector.update_every={every}")
    if cfg.selector.mode != "paper":
        raise ValueError(f"bench stress checks the paper's REINFORCE: selector.mode must be paper, "
                         f"got {cfg.selector.mode}")
    h = Harness(cfg)
    ifn = h.ifn
    assert ifn is not None and ifn.rl is not None
    rl, gamma, alpha = ifn.rl, cfg.selector.gamma, cfg.selector.alpha
    window: list[tuple[list[torch.Tensor], float, int]] = []
    pending: dict[str, Any] = {}

    def on_logits(logits: torch.Tensor) -> None:  # grad of the step's sum_i log p_i, recorded
        s = F.logsigmoid(logits).sum()
        pending["g"] = [g.detach().clone() for g in torch.autograd.grad(s, ifn.params, retain_graph=True)]
        pending["n"] = logits.numel()

    h.on_logits = on_logits
    seen: dict[str, Any] = {}
    update = rl.update

    def observed_update() -> None:  # records G, N and theta as the update sees them, then runs it
        seen.update(acc=[a.detach().clone() for a in rl.acc], n=rl.n,
                    theta=[p.detach().clone() for p in ifn.params])
        if dist.is_initialized() and dist.get_world_size() > 1:  # the update applies the ranks' sums
            flat = torch.cat([a.flatten() for a in seen["acc"]] + [torch.tensor([float(rl.n)],
                                                                               dtype=seen["acc"][0].dtype)])
            dist.all_reduce(flat)
            off, total_acc = 0, []
            for a in seen["acc"]:
                total_acc.append(flat[off:off + a.numel()].view_as(a).clone())
                off += a.numel()
            seen.update(total_acc=total_acc, total_n=float(flat[-1]))
        else:
            seen.update(total_acc=seen["acc"], total_n=seen["n"])
        update()

    rl.update = observed_update  # type: ignore[method-assign]
    rss: list[tuple[int, float, float]] = [(0, rss_mib(), _arrow_mib())]
    checks = {"steps": 0, "updates_checked": 0, "syncs_checked": 0}
    max_rel_err = 0.0
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        h.sections.new_step()
        batch = h.next_batch()
        out = h.step(batch, step)
        if step % opts.rss_every == 0:  # before this step's checks, which allocate
            rss.append((step, rss_mib(), _arrow_mib()))
        checks["steps"] += 1
        vals = [out[key] for key in ("loss_mixed", "loss_pure", "loss_tgt", "loss_src", "reward")]
        if not all(math.isfinite(v) for v in vals):
            fail(f"step {step}: non-finite loss or reward {vals}")
        if abs(out["reward"] - (out["loss_pure"] - out["loss_tgt"])) > 1e-5 * max(1.0, abs(out["loss_pure"])):
            fail(f"step {step}: reward {out['reward']} != loss_pure - loss_tgt "
                 f"{out['loss_pure'] - out['loss_tgt']}")
        window.append((pending.pop("g"), float(out["reward_shaped"]), int(pending.pop("n"))))
        if step % every == 0:
            checks["updates_checked"] += 1
            if rl.updates != step // every:
                fail(f"step {step}: {rl.updates} selector updates, expected {step // every}")
            if rl.n != 0 or any(bool(t.abs().sum()) for t in rl.trace + rl.acc):
                fail(f"step {step}: the REINFORCE window did not restart (N={rl.n})")
            if not seen:
                fail(f"step {step}: no selector update ran")
            else:
                n_want = sum(x[2] for x in window)
                if seen["n"] != n_want:
                    fail(f"step {step}: the update used N={seen['n']}, expected {n_want}")
                if window:
                    err = _check_g(window, seen["acc"], gamma, cfg.selector.causal_credit)
                    max_rel_err = max(max_rel_err, err)
                    if err > 1e-4:
                        fail(f"step {step}: G differs from sum_k g_k r_accu_k by {err:.2e} (relative)")
                for p, t, a in zip(ifn.params, seen["theta"], seen["total_acc"]):
                    if seen["total_n"] > 0 and not torch.equal(p.detach(),
                                                               t.add(a, alpha=alpha / seen["total_n"])):
                        fail(f"step {step}: the selector did not move by alpha G / N")
                        break
                seen.clear()
            if not all(bool(torch.isfinite(p).all()) for p in ifn.params):
                fail(f"step {step}: non-finite selector parameters")
            window = []
        elif rl.n != sum(n for _, _, n in window):
            fail(f"step {step}: REINFORCE N={rl.n}, expected {sum(n for _, _, n in window)}")
        if step % k == 0:
            checks["syncs_checked"] += 1
            if h.syncs != step // k:
                fail(f"step {step}: {h.syncs} syncs, expected {step // k}")
            differ = pure_equals_mixed(h.module, cfg.scn.sync_optimizer_state)
            if differ:
                fail(f"step {step}: pure != mixed right after the sync: {differ[:3]}")
            if not (_finite_module(h.module.mixed_tgt) and _finite_module(h.module.mixed_tower)
                    and _finite_module(h.module.src)):
                fail(f"step {step}: non-finite table or tower weights")
    seconds = time.perf_counter() - t0
    flat = _flatness(rss, opts.stress_warmup or max(2 * max(k, every), total // 3))
    res = {"steps": total, "sync_every": k, "update_every": every, "syncs": h.syncs, "selector_updates": rl.updates,
           "checks": checks, "failures": failures, "max_update_rel_err": max_rel_err,
           "seconds": round(seconds, 1),
           "step_ms": summary([1e3 * sum(s.get(x, 0.0) for x in TOP) for s in h.sections.steps], 2),
           "rss": flat, "rss_samples": [[s, round(r, 1), round(a, 1)] for s, r, a in rss],
           "rss_samples_columns": ["step", "rss_mib", "pyarrow_allocated_mib"],
           "final_p_mean": out.get("p_mean"), "batch_size": cfg.data.batch_size, "data": cfg.data.path,
           "rank": dist.get_rank() if dist.is_initialized() else 0,
           "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    return res


def _check_g(window: list, acc: list, gamma: float, causal: bool) -> float:
    """Relative error of the accumulator G against sum_k g_k r_accu_k recomputed from the window's
    per-step gradients g_k and rewards (in float64)."""
    import torch

    rewards = [x[1] for x in window]
    T = len(window)
    want = [torch.zeros_like(a, dtype=torch.float64) for a in acc]
    for kk, (g, _, _) in enumerate(window):
        if causal:  # r_accu_k = sum_{j>=1} gamma^(j-1) r_{k+j}
            r_acc = sum(gamma ** (j - 1) * rewards[kk + j] for j in range(1, T - kk))
        else:  # the paper: r_accu_k = sum_{j>=0} gamma^j r_{k+j}
            r_acc = sum(gamma ** j * rewards[kk + j] for j in range(0, T - kk))
        for w, gi in zip(want, g):
            w += gi.double() * r_acc
    num = sum(float((a.double() - w).norm() ** 2) for a, w in zip(acc, want))
    den = sum(float(w.norm() ** 2) for w in want)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _arrow_mib() -> float:
    import pyarrow as pa

    return pa.total_allocated_bytes() / 2 ** 20


def _flatness(rss: list[tuple[int, float, float]], warm: int) -> dict[str, Any]:
    after = [r for s, r, _ in rss if s >= warm]
    if len(after) < 4:
        return {"growth": None, "baseline_mib": None, "end_mib": None, "warmup_steps": warm,
                "note": "too few samples after warm-up; run more steps or sample more often (--rss-every)"}
    m = min(5, len(after) // 2)
    base, end = statistics.median(after[:m]), statistics.median(after[-m:])
    return {"growth": round(end / base - 1, 5), "baseline_mib": round(base, 1), "end_mib": round(end, 1),
            "max_mib": round(max(after), 1), "warmup_steps": warm, "samples_after_warmup": len(after)}


def markdown(env: dict[str, Any]) -> str:
    r = env["results"]
    f = r["rss"]
    lines = [header_md(env, "Stress: many sync windows and selector updates"),
             f"{r['steps']} steps of {r['batch_size']} target rows on {r['data']}, k = {r['sync_every']}, "
             f"selector window {r['update_every']}: {r['syncs']} syncs, {r['selector_updates']} selector updates, "
             f"{r['seconds']:.0f} s (step {r['step_ms']['median']:.1f} ms median)"
             + (f"; rank 0 of {r['world_size']} gloo ranks, every rank checked (counts summed over ranks, RSS of "
                f"the rank that grew most: {r.get('rss_rank')})." if r.get("world_size", 1) > 1 else "."), "",
             md_table(["check", "count"], [[k, v] for k, v in r["checks"].items()] +
                      [["max relative error of G vs sum_k g_k r_accu_k", r["max_update_rel_err"]],
                       ["failures", len(r["failures"])]]), "",
             f"RSS after warm-up ({f['warmup_steps']} steps): {f['baseline_mib']} -> {f['end_mib']} MiB "
             f"(growth {f['growth']}), max {f.get('max_mib')} MiB; samples every {env['options']['rss_every']} steps "
             f"in the JSON.", ""]
    if r["failures"]:
        lines += ["Failures:", ""] + [f"- {x}" for x in r["failures"]] + [""]
    return "\n".join(lines)
