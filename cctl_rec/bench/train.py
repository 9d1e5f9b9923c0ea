"""``cctl-rec bench train``: what CCTL costs over a single-tower DNN, and where a CCTL step goes.

Five measurements, all on the real product code:

1. **throughput** — ``cctl_rec.train.loop.train`` itself (DMP on a 1-rank gloo group), run for
   ``warmup + steps`` steps per variant, variants alternating within each of ``repeats``
   rounds: DNN and CCTL, fp32 and ``run.precision=bf16``, and CCTL with
   ``selector.mode=influence``. ``train()`` logs target samples/s every ``warmup`` steps; the first
   window (warm-up) is dropped, the rest are the samples.
2. **peak RSS** — one fresh (spawned) process per variant running ``train()``: its VmHWM.
3. **breakdown** — :class:`~cctl_rec.bench.harness.Harness` steps (the statements of
   ``train()``'s loop, same model) with timers per part, hooks inside forward and backward; full
   CCTL steps alternate with the ablation "SCN towers only" (:meth:`Harness.scn_step`) and with
   the DNN's step. The mixed -> pure sync and the selector's REINFORCE update run every k /
   ``update_every`` steps: each is timed on its own and amortised over its period.
4. **threads** — the CCTL step with 1 vs the machine's vCPUs intra-op threads.
5. **AUC** — fp32 vs bf16 target test AUC after ``auc_steps`` steps (0: one pass) of ``train()``.

The cost of CCTL over its SCN towers: ``step(CCTL) / SCN - 1``, where SCN = the ablation step
(embeddings, both towers, their losses, backward and optimizers, on the same batch shapes) minus
SAN's forward and backward (the source rows need SAN to reach the mixed tower, so the ablation
keeps it and its hooks measure it). Everything else — SAN, selector, REN, reward, sync,
metrics and data — is the overhead the target bounds by 10%.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from typing import Any, Optional

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, fmt_stat, header_md, md_table,
                                   peak_rss_mib, spawn_pool, summary, target, timed, train_config)

logger = logging.getLogger(__name__)

VARIANTS = {  # name -> config overrides
    "dnn/fp32": ["model.name=dnn", "run.precision=fp32"],
    "cctl/fp32": ["model.name=cctl", "run.precision=fp32"],
    "dnn/bf16": ["model.name=dnn", "run.precision=bf16"],
    "cctl/bf16": ["model.name=cctl", "run.precision=bf16"],
    "cctl-influence/fp32": ["model.name=cctl", "run.precision=fp32", "selector.mode=influence"],
}
TOP = ("data", "forward", "selector_score", "losses", "reward", "influence", "backward_opt", "metrics",
       "selector_update", "sync")
"""The step's top-level timed parts (they add up to the step)."""
OVERHEAD = ("data", "san", "san_bwd", "selector_score", "selector_update", "ren", "reward", "influence", "metrics")
"""The parts of a CCTL step that are not its SCN towers, each timed directly (sync and the
selector update are added amortised)."""


def _train_once(opts: BenchOptions, extra: list[str], steps: int, log_every: int, eval_rows: int
                ) -> dict[str, Any]:
    """``train()`` for ``steps`` steps in a temporary run directory; its metrics."""
    from cctl_rec.train.loop import train

    cfg = train_config(opts, *extra, f"run.steps={steps}", f"run.log_every={log_every}",
                       f"run.max_eval_rows={eval_rows}", "run.checkpoint_every=0")
    with tempfile.TemporaryDirectory(prefix="cctl-bench-") as d:
        return train(cfg, d)


def _rss_child(opts: BenchOptions, extra: list[str], steps: int, log_every: int) -> dict[str, Any]:
    """In a fresh process: ``train()`` for ``steps`` steps; its peak RSS and samples/s."""
    import torch

    from cctl_rec.logging_utils import setup_logging

    setup_logging()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    m = _train_once(opts, extra, steps, log_every, 4096)
    return {"peak_rss_mib": round(peak_rss_mib(), 1), "train_samples_per_s": m["train_samples_per_s"],
            "steps": m["steps"]}


def measure_throughput(opts: BenchOptions, variants: dict[str, list[str]]) -> dict[str, Any]:
    win = max(1, opts.warmup)
    steps = win + -(-opts.steps // win) * win
    rates: dict[str, list[float]] = {v: [] for v in variants}
    whole: dict[str, list[float]] = {v: [] for v in variants}
    batch = train_config(opts).data.batch_size
    for r in range(opts.repeats):
        for name, extra in variants.items():
            m = _train_once(opts, extra, steps, win, 2048)
            rows = [h for h in m["history"] if h["step"] > win]
            rates[name] += [h["ex_per_s"] for h in rows]
            whole[name].append(m["train_samples_per_s"])
            logger.info("throughput round %d %s: %.0f target samples/s", r + 1, name,
                        statistics.median([h["ex_per_s"] for h in rows]) if rows else float("nan"))
    out = {}
    for name in variants:
        s = summary(rates[name], 1)
        out[name] = {"target_samples_per_s": s,
                     "step_ms": summary([1e3 * batch / x for x in rates[name]], 2),
                     "whole_run_samples_per_s": summary(whole[name], 1),
                     "windows": len(rates[name]), "window_steps": win, "steps_per_run": steps}
    return out


def measure_rss(opts: BenchOptions, variants: dict[str, list[str]]) -> dict[str, Any]:
    out = {}
    steps = max(opts.warmup + opts.steps, 2)
    for name, extra in variants.items():
        with spawn_pool(1) as pool:
            out[name] = pool.submit(_rss_child, opts, extra, steps, steps).result()
        logger.info("peak RSS %s: %.0f MiB", name, out[name]["peak_rss_mib"])
    return out


def _totals(steps: list[dict[str, float]], keys: tuple[str, ...]) -> list[float]:
    return [sum(s.get(k, 0.0) for k in keys) for s in steps]


def measure_breakdown(opts: BenchOptions) -> dict[str, Any]:
    """Harness steps, alternating: CCTL fp32 (full, then SCN ablation), CCTL bf16 (full, SCN), DNN fp32."""
    from cctl_rec.bench.harness import Harness

    hs = {"cctl/fp32": Harness(train_config(opts, "model.name=cctl", "run.precision=fp32"), hooks=True),
          "cctl/bf16": Harness(train_config(opts, "model.name=cctl", "run.precision=bf16"), hooks=True),
          "dnn/fp32": Harness(train_config(opts, "model.name=dnn", "run.precision=fp32"), hooks=True)}
    full: dict[str, list[dict[str, float]]] = {k: [] for k in hs}
    scn: dict[str, list[dict[str, float]]] = {k: [] for k in hs if k.startswith("cctl")}
    n = {k: 0 for k in hs}
    total = opts.warmup + opts.repeats * opts.steps
    try:
        for i in range(total):
            for name, h in hs.items():
                h.sections.new_step()
                n[name] += 1
                h.step(h.next_batch(), n[name])
                if i >= opts.warmup:
                    full[name].append(h.sections.cur)
                if name in scn:
                    h.sections.new_step()
                    h.scn_step(h.next_batch())
                    if i >= opts.warmup:
                        scn[name].append(h.sections.cur)
        out: dict[str, Any] = {}
        for name, h in hs.items():
            cfg = h.cfg
            steps = full[name]
            names = sorted({k for s in steps for k in s if not k.endswith("_ran")})
            sec = {k: summary([1e3 * s.get(k, 0.0) for s in steps], 3) for k in names}
            step_ms = summary([1e3 * t for t in _totals(steps, TOP)], 3)
            res: dict[str, Any] = {"sections_ms": sec, "step_ms": step_ms, "steps": len(steps)}
            if h.ifn is not None:
                # periodic parts, timed on their own and amortised over their period
                sync_ms = [1e3 * t for t in timed(h.sync, max(3, opts.repeats))]
                res["sync_ms"] = summary(sync_ms, 3)
                res["sync_every"] = cfg.scn.sync_every
                if h.ifn.rl is not None:
                    upd_ms = [1e3 * t for t in timed(h.ifn.rl.update, max(3, opts.repeats))]
                    res["selector_update_ms"] = summary(upd_ms, 4)
                    res["update_every"] = cfg.selector.update_every
                amort = res["sync_ms"]["median"] / cfg.scn.sync_every + (
                    res["selector_update_ms"]["median"] / cfg.selector.update_every if "selector_update_ms" in res
                    else 0.0)
                # per-step medians exclude the rare steps where a sync / update ran; add them amortised
                regular = [sum(s.get(k, 0.0) for k in TOP if k != "sync") for s in regular_steps(steps)]
                res["step_ms_amortised"] = round(1e3 * statistics.median(regular) + amort, 3)
                s_steps = scn[name]
                scn_tot = [1e3 * t for t in _totals(s_steps, ("forward", "losses", "backward_opt"))]
                san = [1e3 * (s.get("san", 0.0) + s.get("san_bwd", 0.0)) for s in s_steps]
                res["scn_ablation_ms"] = summary(scn_tot, 3)
                res["scn_ablation_san_ms"] = summary(san, 3)
                res["scn_ms"] = round(statistics.median(scn_tot) - statistics.median(san), 3)
                res["overhead_over_scn_ablation"] = round(res["step_ms_amortised"] / res["scn_ms"] - 1, 4)
                # attributed: per step, the directly timed non-SCN parts over the rest of the same step
                # (both under the same load), median over steps
                ratios = []
                for s in regular_steps(steps):
                    o = sum(s.get(x, 0.0) for x in OVERHEAD) + amort / 1e3
                    ratios.append(o / (sum(s.get(x, 0.0) for x in TOP if x != "sync") - o + 1e-12))
                res["overhead_over_scn_attributed"] = summary(ratios, 4)
                res["parts_ms"] = _parts(sec, res)
            else:
                res["parts_ms"] = _parts(sec, res)
            out[name] = res
        tower, width = hs["cctl/fp32"].cfg.model.tower, hs["cctl/fp32"].module.width
        b = hs["cctl/fp32"].cfg.data.batch_size
        bs = hs["cctl/fp32"].stream.src_batch
        macs = _mlp_macs(width, tower)
        out["tower_flops"] = {"macs_per_row": macs, "dnn_rows": b, "cctl_rows": 2 * b + bs,
                              "ratio": round((2 * b + bs) / b, 3),
                              "note": "analytic count of the tower's multiply-adds (Linear layers), not timed"}
        return out
    finally:
        for h in hs.values():
            h.close()


def regular_steps(steps: list[dict[str, float]]) -> list[dict[str, float]]:
    """The steps without a sync or a selector update in them (those are timed on their own)."""
    return [s for s in steps if "sync_ran" not in s and "update_ran" not in s] or steps


def _mlp_macs(width: int, hidden: tuple[int, ...]) -> int:
    dims = [width, *hidden, 1]
    return sum(a * b for a, b in zip(dims, dims[1:]))


def _parts(sec: dict[str, dict[str, Any]], res: dict[str, Any]) -> dict[str, float]:
    """Median ms of each part of the step, the nested hooks taken out of their parents."""
    g = lambda k: sec.get(k, {}).get("median") or 0.0  # noqa: E731
    parts = {
        "data": g("data"),
        "embeddings (fwd)": g("embeddings"),
        "towers (fwd)": g("towers"),
        "towers (bwd)": g("towers_bwd"),
        "SAN (fwd)": g("san"),
        "SAN (bwd)": g("san_bwd"),
        "forward other (tokens, slicing)": max(0.0, g("forward") - g("embeddings") - g("towers") - g("san")),
        "selector scoring": g("selector_score"),
        "losses (BCE, weights)": max(0.0, g("losses") - g("ren")),
        "REN loss (fwd)": g("ren"),
        "reward": g("reward"),
        "influence": g("influence"),
        "backward rest (embeddings + fused TBE update, losses, REN, DDP)":
            max(0.0, g("backward_opt") - g("towers_bwd") - g("san_bwd") - g("optimizer_dense")),
        "Adam + data_parallel tables": g("optimizer_dense"),
        "metrics": g("metrics"),
        "selector REINFORCE step": g("selector_update"),
    }
    if "sync_ms" in res:
        parts["sync (amortised)"] = res["sync_ms"]["median"] / res["sync_every"]
    if "selector_update_ms" in res:
        parts["selector update (amortised)"] = res["selector_update_ms"]["median"] / res["update_every"]
    return {k: round(v, 4) for k, v in parts.items()}


def measure_threads(opts: BenchOptions) -> dict[str, Any]:
    """CCTL fp32 harness steps with 1 thread and with one per vCPU, alternating in blocks."""
    import torch

    from cctl_rec.bench.harness import Harness

    counts = sorted({1, os.cpu_count() or 1})
    before = torch.get_num_threads()
    h = Harness(train_config(opts, "model.name=cctl", "run.precision=fp32"))
    times: dict[int, list[float]] = {c: [] for c in counts}
    step = 0
    block = max(2, min(5, opts.steps))
    try:
        for r in range(max(1, opts.repeats)):
            for c in counts:
                torch.set_num_threads(c)
                for i in range(block + 1):
                    step += 1
                    b = h.next_batch()
                    t0 = time.perf_counter()
                    h.step(b, step)
                    if i:  # the first step after a change of thread count warms the pool
                        times[c].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {str(c): {"step_ms": summary([1e3 * t for t in times[c]], 2)} for c in counts}


def measure_auc(opts: BenchOptions) -> dict[str, Any]:
    """fp32 vs bf16 CCTL: target test AUC of the pure tower after ``auc_steps`` (0: one pass)."""
    out: dict[str, Any] = {"steps": opts.auc_steps or "one pass"}
    for prec in ("fp32", "bf16"):
        cfg_steps = opts.auc_steps
        t0 = time.perf_counter()
        m = _train_once(opts, ["model.name=cctl", f"run.precision={prec}"], cfg_steps, 100, 0)
        out[prec] = {"target_test": m["target_test"], "target_valid": m["target_valid"], "steps": m["steps"],
                     "train_samples_per_s": round(m["train_samples_per_s"], 1),
                     "seconds": round(time.perf_counter() - t0, 1)}
        logger.info("AUC run %s: auc=%.4f after %d steps", prec, m["target_test"]["auc"], m["steps"])
    out["auc_diff_bf16_minus_fp32"] = round(out["bf16"]["target_test"]["auc"] - out["fp32"]["target_test"]["auc"], 5)
    return out


PARTS = ("throughput", "rss", "breakdown", "threads", "auc")


def run(opts: BenchOptions, parts: tuple[str, ...] = PARTS) -> tuple[dict[str, Any], str]:
    """Runs the train benchmark (``parts``: a subset of :data:`PARTS`); returns (the JSON envelope,
    its markdown)."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"bench train --parts: unknown part(s) {bad}; expected a subset of {', '.join(PARTS)}")
    cfg = train_config(opts)
    with LoadSampler() as load:
        res: dict[str, Any] = {"config": {
            "data": cfg.data.path, "batch_size": cfg.data.batch_size, "src_ratio": cfg.data.src_ratio,
            "tower": list(cfg.model.tower), "san_hidden": list(cfg.model.san_hidden),
            "sync_every": cfg.scn.sync_every, "update_every": cfg.selector.update_every,
            "threads": opts.threads or "torch default"}}
        if "throughput" in parts:
            res["throughput"] = measure_throughput(opts, VARIANTS)
            res["ratios"] = {"cctl_over_dnn_step_time_fp32": _ratio(res, "dnn/fp32", "cctl/fp32"),
                             "cctl_over_dnn_step_time_bf16": _ratio(res, "dnn/bf16", "cctl/bf16"),
                             "bf16_speedup_cctl": _ratio(res, "cctl/bf16", "cctl/fp32"),
                             "bf16_speedup_dnn": _ratio(res, "dnn/bf16", "dnn/fp32"),
                             "influence_over_paper_step_time": _ratio(res, "cctl/fp32", "cctl-influence/fp32")}
        if "rss" in parts:
            res["rss"] = measure_rss(opts, {k: v for k, v in VARIANTS.items() if "influence" not in k})
        if "breakdown" in parts:
            res["breakdown"] = measure_breakdown(opts)
        if "threads" in parts:
            res["threads"] = measure_threads(opts)
        if "auc" in parts and opts.auc_steps >= 0:
            res["auc"] = measure_auc(opts)
    env = envelope("train", opts, res, load, _targets(res))
    return env, markdown(env)


def _ratio(res: dict[str, Any], a: str, b: str) -> Optional[float]:
    t = res.get("throughput", {})
    if a in t and b in t and t[a]["target_samples_per_s"]["median"] and t[b]["target_samples_per_s"]["median"]:
        return round(t[a]["target_samples_per_s"]["median"] / t[b]["target_samples_per_s"]["median"], 3)
    return None


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    bd = res.get("breakdown", {})
    for prec in ("fp32", "bf16"):
        r = bd.get(f"cctl/{prec}")
        if r and "overhead_over_scn_ablation" in r:
            a = r["overhead_over_scn_attributed"]["median"]
            out.append(target(f"CCTL over its SCN towers ({prec}), attributed", "<= +10%", a, a <= 0.10,
                              "per step: SAN, selector, REN, reward, metrics, data (+ sync, update amortised) over "
                              "the rest of the step; median over steps"))
            b = r["overhead_over_scn_ablation"]
            out.append(target(f"CCTL over its SCN towers ({prec}), ablation", "<= +10%", b, b <= 0.10,
                              f"step {r['step_ms_amortised']:.1f} ms vs SCN-only step {r['scn_ms']:.1f} ms "
                              f"(medians of different steps)"))
    speed = _ratio(res, "cctl/bf16", "cctl/fp32")
    if speed is not None:
        out.append(target("bf16 speed-up (CCTL)", ">= 2x fp32", speed, speed >= 2.0,
                          "target samples/s, median over windows"))
    auc = res.get("auc")
    if auc:
        d = auc["auc_diff_bf16_minus_fp32"]
        out.append(target("bf16 target AUC", "within 0.001 of fp32", d, abs(d) <= 0.001,
                          f"after {auc['fp32']['steps']} steps"))
    return out


def markdown(env: dict[str, Any]) -> str:
    res = env["results"]
    c = res["config"]
    lines = [header_md(env, "Training cost: DNN vs CCTL, fp32 vs bf16"),
             f"Batch {c['batch_size']} target rows (+{c['src_ratio']:g}x source), tower {c['tower']}, "
             f"k = {c['sync_every']}, selector window {c['update_every']}, threads {c['threads']}.", ""]
    if "throughput" in res:
        t = res["throughput"]
        rows = []
        for name, r in t.items():
            rss = res.get("rss", {}).get(name, {}).get("peak_rss_mib")
            rows.append([name, fmt_stat(r["target_samples_per_s"], nd=0), fmt_stat(r["step_ms"], nd=1),
                         r["windows"], rss])
        lines += ["## Throughput (`train()`), target samples/s, median (min–max) over windows", "",
                  md_table(["variant", "target samples/s", "step ms", "windows", "peak RSS MiB (fresh process)"],
                           rows), ""]
        for a, b, what in (("dnn/fp32", "cctl/fp32", "CCTL / DNN step time, fp32 (DNN / CCTL samples/s)"),
                           ("dnn/bf16", "cctl/bf16", "CCTL / DNN step time, bf16"),
                           ("cctl/bf16", "cctl/fp32", "bf16 speed-up, CCTL (bf16 / fp32 samples/s)"),
                           ("dnn/bf16", "dnn/fp32", "bf16 speed-up, DNN"),
                           ("cctl/fp32", "cctl-influence/fp32",
                            "influence / paper selector step time (issue #10)")):
            r = _ratio(res, a, b)
            if r is not None:
                lines.append(f"- {what}: {r:.2f}")
        lines.append("")
    if "breakdown" in res:
        bd = res["breakdown"]
        names = [n for n in ("cctl/fp32", "cctl/bf16", "dnn/fp32") if n in bd]
        keys = list(bd[names[0]]["parts_ms"])
        rows = [[k] + [bd[n]["parts_ms"].get(k) for n in names] for k in keys]
        rows.append(["**step (median of per-step totals)**"] + [bd[n]["step_ms"]["median"] for n in names])
        lines += ["## Where a step goes (harness, ms, medians)", "",
                  md_table(["part"] + names, rows), ""]
        for n in names:
            r = bd[n]
            if "scn_ms" in r:
                lines.append(f"- {n}: step {r['step_ms_amortised']:.1f} ms (sync and selector update amortised) "
                             f"vs SCN towers {r['scn_ms']:.1f} ms (ablation {fmt_stat(r['scn_ablation_ms'])} ms "
                             f"minus SAN {fmt_stat(r['scn_ablation_san_ms'])} ms): overhead "
                             f"{100 * r['overhead_over_scn_ablation']:+.1f}% by ablation, "
                             f"{fmt_stat(r['overhead_over_scn_attributed'], 100, 1, '%')} attributed per step; "
                             f"one sync {fmt_stat(r['sync_ms'])} ms")
        tf = bd.get("tower_flops")
        if tf:
            lines.append(f"- tower multiply-adds per step, CCTL / DNN: {tf['ratio']:.2f} (analytic: "
                         f"{tf['cctl_rows']} vs {tf['dnn_rows']} rows through a {tf['macs_per_row']:,}-MAC tower)")
        lines.append("")
    if "threads" in res:
        lines += ["## Intra-op threads (CCTL fp32 step, harness)", "",
                  md_table(["threads", "step ms"], [[k, fmt_stat(v["step_ms"])] for k, v in res["threads"].items()]),
                  ""]
    if "auc" in res:
        a = res["auc"]
        lines += ["## fp32 vs bf16 target test AUC (pure tower, full test split)", "",
                  md_table(["precision", "steps", "test AUC", "test logloss", "valid AUC", "samples/s"],
                           [[p, a[p]["steps"], a[p]["target_test"]["auc"], a[p]["target_test"]["logloss"],
                             a[p]["target_valid"]["auc"], a[p]["train_samples_per_s"]] for p in ("fp32", "bf16")]),
                  "", f"- AUC bf16 - fp32: {a['auc_diff_bf16_minus_fp32']:+.4f}", ""]
    return "\n".join(lines)
