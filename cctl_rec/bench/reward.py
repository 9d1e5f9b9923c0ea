"""``cctl-rec bench reward``: the selector's REINFORCE bookkeeping, per step and per update.

Harness steps of CCTL (``selector.mode=paper``, the paper's soft weights, and ``bernoulli``, the
DVRL actions) alternate; per step the IFN's parts are timed where ``train()`` runs them:

- scoring: ``IFN.weights`` (the selector's forward on the SAN-aligned source rows);
- bookkeeping: ``IFN.step`` (grad of sum_i log p_i over the selector's parameters, the reward
  shaper, the eligibility trace e and the accumulator G of :class:`~cctl_rec.train.reinforce.Reinforce`);
- the update: ``Reinforce.update`` (theta += alpha G / N, then the window restarts), timed on its
  own ``repeats`` times and amortised over ``selector.update_every``.

Shares are of the median full step (data fetch included) of the same harness.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, fmt_stat, header_md, md_table, summary,
                                   target, timed, train_config)
from cctl_rec.bench.train import TOP, regular_steps

logger = logging.getLogger(__name__)

MODES = ("paper", "bernoulli")


def run(opts: BenchOptions) -> tuple[dict[str, Any], str]:
    from cctl_rec.bench.harness import Harness

    with LoadSampler() as load:
        hs = {m: Harness(train_config(opts, "model.name=cctl", f"selector.mode={m}")) for m in MODES}
        steps: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        n = 0
        for i in range(opts.warmup + opts.repeats * opts.steps):
            n += 1
            for m, h in hs.items():
                h.sections.new_step()
                h.step(h.next_batch(), n)
                if i >= opts.warmup:
                    steps[m].append(h.sections.cur)
        res: dict[str, Any] = {}
        for m, h in hs.items():
            assert h.ifn is not None and h.ifn.rl is not None
            every = h.cfg.selector.update_every
            # steps where an update ran are left out of the per-step median; the update is timed alone
            regular = regular_steps(steps[m])
            step_ms = statistics.median([1e3 * sum(s.get(k, 0.0) for k in TOP) for s in regular])
            score = [1e3 * s["selector_score"] for s in regular]
            book = [1e3 * s["selector_update"] for s in regular]
            upd = [1e3 * t for t in timed(h.ifn.rl.update, max(5, opts.repeats))]
            n_params = sum(p.numel() for p in h.ifn.params)
            per_step = statistics.median(book) + statistics.median(upd) / every
            res[m] = {"step_ms": round(step_ms, 3), "scoring_ms": summary(score, 4),
                      "bookkeeping_per_step_ms": summary(book, 4), "update_ms": summary(upd, 4),
                      "update_every": every, "selector_params": n_params, "source_rows_per_step": h.stream.src_batch,
                      "bookkeeping_share": round(per_step / step_ms, 5),
                      "bookkeeping_share_at_update_every_1000": round(
                          (statistics.median(book) + statistics.median(upd) / 1000) / step_ms, 5),
                      "with_scoring_share": round((per_step + statistics.median(score)) / step_ms, 5),
                      "steps": len(regular)}
            logger.info("reward loop %s: %.3f ms per step + %.3f ms per update (%.2f%% of a %.1f ms step)", m,
                        statistics.median(book), statistics.median(upd), 100 * res[m]["bookkeeping_share"], step_ms)
    tg = [target(f"REINFORCE bookkeeping ({m})", "<= 2% of a step", r["bookkeeping_share"],
                 r["bookkeeping_share"] <= 0.02, f"{r['bookkeeping_per_step_ms']['median']:.3f} ms/step + "
                                                 f"{r['update_ms']['median']:.3f} ms / {r['update_every']} steps")
          for m, r in res.items()]
    env = envelope("reward", opts, res, load, tg)
    return env, markdown(env)


def markdown(env: dict[str, Any]) -> str:
    r = env["results"]
    rows = [[m, fmt_stat(v["bookkeeping_per_step_ms"], nd=3), fmt_stat(v["update_ms"], nd=3), v["update_every"],
             fmt_stat(v["scoring_ms"], nd=3), v["step_ms"], f"{100 * v['bookkeeping_share']:.2f}%",
             f"{100 * v['with_scoring_share']:.2f}%"] for m, v in r.items()]
    return "\n".join([header_md(env, "REINFORCE reward loop"),
                      md_table(["mode", "bookkeeping ms/step", "update ms", "update every", "scoring ms/step",
                                "step ms", "share (bookkeeping + update)", "share with scoring"], rows), "",
                      "ms are median (min–max) over steps; the update is amortised over its window.", ""])
