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
- the step right after every sync: the reward is 0 (the pure and the mixed network are one, so
  Loss_pure = Loss_tgt on the step's target rows; within 1e-6 of the loss, exactly 0 when measured);
- RSS (``/proc/self/statm``, sampled every ``rss_every`` steps right after the step, before the
  checks) may grow by less than 5% after warm-up (``stress_warmup`` steps; default the first third
  of the run, at least two windows): median of the first five samples after warm-up vs median of
  the last five. The allocators (pyarrow's mimalloc pool, glibc) keep freed pages while the data
  path's buffers settle: the Parquet reader alone grows RSS for about 1500 batches of 512 rows on
  ``small`` and then stays flat over further passes, so a short run mistakes that for growth.

``--preset meituan --scale-ids F`` is the design card's run: the data is ``cctl-rec datagen --preset
meituan --scale F --scale-ids`` (the Meituan dataset's shape, Table 1 of the paper, with its id
spaces and sample counts multiplied by F; generated into ``--data`` or reused from there), k and
the selector window are the paper's 1000 unless given, and a run shorter than 20 of each is refused
before anything is generated.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from typing import Any

from cctl_rec.bench.common import (MIN_WINDOWS, BenchOptions, LoadSampler, envelope, header_md, md_table, rss_mib,
                                   summary, target, train_config)
from cctl_rec.bench.train import TOP

logger = logging.getLogger(__name__)

PAPER_WINDOW = 1000
"""The paper's k and selector window (§3.1), the defaults of ``--preset``."""

REWARD_TOL = 1e-6
"""|reward| allowed right after a sync, relative to max(1, Loss_pure)."""

CURVE_POINTS = 20
"""RSS samples per rank kept in the results' curve (the markdown's RSS table)."""


def preset_args(args: Any) -> None:
    """``bench stress --preset NAME --scale-ids F``: checks both and fills in what they imply
    (``--data`` data/NAME-idsF, k and the selector window the paper's 1000, ``--stress-steps``
    20 windows). Raises ValueError naming the value before anything is written."""
    from cctl_rec.commands.datagen import check_split_rows
    from cctl_rec.datagen.presets import PRESETS

    if args.preset is None or args.scale_ids is None:
        raise ValueError(f"bench stress --preset and --scale-ids go together (the preset and the factor of its id "
                         f"spaces), got --preset {args.preset} --scale-ids {args.scale_ids}")
    if args.preset not in PRESETS:
        raise ValueError(f"bench stress --preset {args.preset!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    f = args.scale_ids
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"bench stress --scale-ids must be a finite number > 0, got {f}")
    try:
        check_split_rows(args.preset, f, True, {})
    except ValueError as e:
        raise ValueError(f"bench stress --scale-ids {f:g}: {e}") from None
    args.sync_every = args.sync_every or PAPER_WINDOW
    args.update_every = args.update_every or PAPER_WINDOW
    if args.stress_steps is None:
        args.stress_steps = MIN_WINDOWS * max(args.sync_every, args.update_every, 1)
    if args.data is None:
        args.data = os.path.join("data", f"{args.preset}-ids{f:g}")


def preset_data(preset: str, scale: float, data: str) -> None:
    """Generates ``cctl-rec datagen --preset PRESET --scale SCALE --scale-ids --seed 0`` into ``data``,
    or reuses the dataset there when it is that one; refuses another finished dataset there."""
    from cctl_rec.data.manifest import MANIFEST, join, read_manifest
    from cctl_rec.datagen.pipeline import generate
    from cctl_rec.datagen.presets import LEGACY_KNOBS, resolve
    from iopath.common.file_io import g_pathmgr

    want = resolve(preset, scale, True, 0).to_json()
    if g_pathmgr.exists(join(data, MANIFEST)):
        manifest = read_manifest(data)
        have = dict(manifest.get("params") or {})
        same = not have.pop("max_shards", None) and _comparable(have, LEGACY_KNOBS) == _comparable(want, {})
        if not same:
            raise ValueError(f"--data {data} holds another dataset (preset {manifest.get('preset')}, scale "
                             f"{have.get('scale')}, ids scaled: {have.get('scale_ids')}, seed {have.get('seed')}); "
                             f"expected --preset {preset} --scale-ids {scale:g} (seed 0): give it a new --data")
        logger.info("stress: reusing %s (datagen --preset %s --scale %g --scale-ids)", data, preset, scale)
        return
    logger.info("stress: generating %s (datagen --preset %s --scale %g --scale-ids)", data, preset, scale)
    generate(data, preset=preset, scale=scale, scale_ids=True, seed=0, workers=min(2, os.cpu_count() or 1),
             progress=False)


def _comparable(params: dict[str, Any], legacy: dict[str, Any]) -> dict[str, Any]:
    """Datagen params without the calibrated biases (the manifest has them, ``resolve`` not yet)."""
    out = dict(params)
    for d in ("src", "tgt"):
        out[d] = {k: v for k, v in dict(out.get(d) or {}).items() if k != "bias"}
    out["knobs"] = {**legacy, **dict(out.get("knobs") or {})}
    return out


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
                                               "wall_ms_per_step", "max_update_rel_err", "max_abs_reward_after_sync",
                                               "rss_curve")} for r in ranks]
            res["checks"] = {k: sum(r["checks"][k] for r in ranks) for k in ranks[0]["checks"]}
            res["max_update_rel_err"] = max(r["max_update_rel_err"] for r in ranks)
            res["max_abs_reward_after_sync"] = max(r["max_abs_reward_after_sync"] for r in ranks)
            growth = [r["rss"]["growth"] for r in ranks]
            worst = max(ranks, key=lambda r: -1.0 if r["rss"]["growth"] is None else r["rss"]["growth"])
            res["rss"] = worst["rss"] if None not in growth else next(r["rss"] for r in ranks
                                                                     if r["rss"]["growth"] is None)
            res["rss_rank"] = worst["rank"]
    if opts.preset is not None:
        res["preset"] = _preset_facts(opts)
    syncs, updates, flat, failures = res["syncs"], res["selector_updates"], res["rss"], res["failures"]
    after_sync = [x for x in failures if "right after the sync at step" in x]  # the reward's, not pure != mixed
    tg = [target("syncs", f">= {MIN_WINDOWS}", syncs, syncs >= MIN_WINDOWS, required=True),
          target("selector updates", f">= {MIN_WINDOWS}", updates, updates >= MIN_WINDOWS, required=True),
          target("RSS growth after warm-up" + (" (worst rank)" if opts.stress_world > 1 else ""), "< 5%",
                 flat["growth"], flat["growth"] is not None and flat["growth"] < 0.05,
                 f"{flat['baseline_mib']} -> {flat['end_mib']} MiB", required=True),
          target("reward right after each sync", f"0 (|r| <= {REWARD_TOL:g} x loss)", res["max_abs_reward_after_sync"],
                 res["checks"]["rewards_after_sync_checked"] > 0 and not after_sync,
                 f"{res['checks']['rewards_after_sync_checked']} steps checked" + (f"; {after_sync[0]}" if after_sync
                                                                                   else ""), required=True),
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
    checks = {"steps": 0, "updates_checked": 0, "syncs_checked": 0, "rewards_after_sync_checked": 0}
    max_rel_err = max_reward_after_sync = 0.0
    report_every = max(k, every)
    report_every *= max(1, math.ceil(total / (50 * report_every)))  # at most ~50 progress lines
    t0 = t_report = time.perf_counter()
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
        if step > k and (step - 1) % k == 0:  # pure == mixed since the last step's sync: Loss_pure = Loss_tgt
            checks["rewards_after_sync_checked"] += 1
            max_reward_after_sync = max(max_reward_after_sync, abs(out["reward"]))
            if not abs(out["reward"]) <= REWARD_TOL * max(1.0, abs(out["loss_pure"])):
                fail(f"step {step}: reward {out['reward']} right after the sync at step {step - 1}, expected 0")
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
        if step % report_every == 0:  # progress of a long run, grep-friendly (rank 0 logs INFO)
            now = time.perf_counter()
            logger.info("stress: step=%d syncs=%d selector_updates=%d rss_mib=%.1f failures=%d ms/step=%.1f "
                        "elapsed_s=%.0f", step, h.syncs, rl.updates, rss_mib(), len(failures),
                        1e3 * (now - t_report) / report_every, now - t0)
            t_report = now
    seconds = time.perf_counter() - t0
    flat = _flatness(rss, opts.stress_warmup or max(2 * max(k, every), total // 3))
    res = {"steps": total, "sync_every": k, "update_every": every, "syncs": h.syncs, "selector_updates": rl.updates,
           "checks": checks, "failures": failures, "max_update_rel_err": max_rel_err,
           "max_abs_reward_after_sync": max_reward_after_sync,
           "seconds": round(seconds, 1), "wall_ms_per_step": round(1e3 * seconds / total, 2),
           "step_ms": summary([1e3 * sum(s.get(x, 0.0) for x in TOP) for s in h.sections.steps], 2),
           "rss": flat, "rss_samples": [[s, round(r, 1), round(a, 1)] for s, r, a in rss],
           "rss_samples_columns": ["step", "rss_mib", "pyarrow_allocated_mib"],
           "rss_curve": _curve(rss),
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


def _curve(rss: list[tuple[int, float, float]]) -> list[list[float]]:
    """About :data:`CURVE_POINTS` evenly spaced (step, RSS MiB) samples, the first and the last included."""
    stride = max(1, (len(rss) - 1) // CURVE_POINTS)
    keep = rss[::stride] + ([rss[-1]] if (len(rss) - 1) % stride else [])
    return [[st, round(r, 1)] for st, r, _ in keep]


def _preset_facts(opts: BenchOptions) -> dict[str, Any]:
    """The preset run's data: preset, factor, id-space sizes (table rows) and rows per split."""
    from cctl_rec.data.manifest import read_manifest

    m = read_manifest(opts.data)
    tables = {f"{dom}/{f['name']}": f["cardinality"] for dom in ("tgt", "src")
              for f in m["schema"][dom]["features"] if f["name"] in ("user_id", "item_id")}
    return {"name": opts.preset, "scale_ids": opts.scale_ids, "tables": tables,
            "rows": {k: sum(s["rows"] for s in v) for k, v in m["splits"].items()},
            "datagen": f"cctl-rec datagen --preset {opts.preset} --scale {opts.scale_ids:g} --scale-ids --seed 0"}


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
    p = r.get("preset")
    lines = [header_md(env, "Stress: many sync windows and selector updates")]
    if p:
        lines += [f"Data: `{p['datagen']}` (the {p['name']} preset's id spaces and samples x {p['scale_ids']:g}): "
                  + ", ".join(f"{k} {v:,} ids" for k, v in p["tables"].items()) + "; rows "
                  + ", ".join(f"{k} {v:,}" for k, v in p["rows"].items()) + ".", ""]
    lines += [f"{r['steps']} steps of {r['batch_size']} target rows on {r['data']}, k = {r['sync_every']}, "
              f"selector window {r['update_every']}: {r['syncs']} syncs, {r['selector_updates']} selector updates, "
              f"{r['seconds']:.0f} s (step {r['step_ms']['median']:.1f} ms median, "
              f"{r.get('wall_ms_per_step', float('nan')):.1f} ms per step with the checks and the data)"
              + (f"; rank 0 of {r['world_size']} gloo ranks, every rank checked (counts summed over ranks, RSS of "
                 f"the rank that grew most: {r.get('rss_rank')})." if r.get("world_size", 1) > 1 else "."), "",
              md_table(["check", "count"], [[k, v] for k, v in r["checks"].items()] +
                       [["max relative error of G vs sum_k g_k r_accu_k", r["max_update_rel_err"]],
                        ["max abs reward right after a sync", r.get("max_abs_reward_after_sync")],
                        ["failures", len(r["failures"])]]), "",
              f"RSS after warm-up ({f['warmup_steps']} steps): {f['baseline_mib']} -> {f['end_mib']} MiB "
              f"(growth {f['growth']}), max {f.get('max_mib')} MiB; samples every {env['options']['rss_every']} steps "
              f"in the JSON.", ""]
    ranks = r.get("ranks") or [{"rank": 0, "rss_curve": r.get("rss_curve") or []}]
    if all(x.get("rss_curve") for x in ranks):
        rows = [[int(pt[0])] + [x["rss_curve"][i][1] if i < len(x["rss_curve"]) else None for x in ranks]
                for i, pt in enumerate(ranks[0]["rss_curve"])]
        lines += ["RSS curve (MiB, sampled right after the step):", "",
                  md_table(["step"] + [f"rank {x['rank']}" for x in ranks], rows), ""]
    if r["failures"]:
        lines += ["Failures:", ""] + [f"- {x}" for x in r["failures"]] + [""]
    return "\n".join(lines)
