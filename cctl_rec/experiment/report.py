"""An experiment's report: results.json, report.md (Table 2-style tables with mean ± std over
seeds, paired differences against the baseline, the paper's numbers beside ours) and PNG plots
(the selector's p histogram over training from TensorBoard — the paper's Fig. 5a —, AUC vs alpha —
Fig. 5b —, learning curves). ``out`` may be a URL: every file is written with
``atomic_write_bytes`` (through iopath), and a remote run's TensorBoard events are read from a
downloaded copy (:func:`p_histograms`)."""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
from typing import Any, Optional

from iopath.common.file_io import g_pathmgr

from cctl_rec import storage
from cctl_rec.data.manifest import atomic_write_bytes, join
from cctl_rec.experiment.spec import ExperimentSpec, slug


def _ms(xs: list[float]) -> tuple[float, float]:
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float], nd: int = 4) -> str:
    if not xs:
        return "-"
    m, s = _ms(xs)
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def summarize(spec: ExperimentSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset and model: the seeds' test AUC / logloss, selector statistics and time."""
    out: dict[str, Any] = {}
    for ds in spec.datasets:
        rows = {}
        for m in spec.models:
            if not m.runs_on(ds.name):
                continue
            rs = [r for r in records if r["dataset"] == ds.name and r["model"] == m.name and r["alpha"] is None]
            ok = [r for r in rs if r["status"] == "ok"]
            sel = [r["metrics"].get("selector") or {} for r in ok]
            rows[m.name] = {
                "seeds": [r["seed"] for r in ok], "failed": [r["seed"] for r in rs if r["status"] != "ok"],
                "auc": [r["metrics"]["target_test"]["auc"] for r in ok],
                "logloss": [r["metrics"]["target_test"]["logloss"] for r in ok],
                "harmful_auc": [s["harmful_auc"] for s in sel if s.get("harmful_auc") is not None],
                "p_clean_minus_harm": [s["p_clean"] - s["p_harmful"] for s in sel
                                       if s.get("p_clean") is not None and s.get("p_harmful") is not None],
                "train_seconds": [r["metrics"]["train_seconds"] for r in ok],
                "wall_seconds": [r["wall_seconds"] for r in rs if "wall_seconds" in r],
                "p_mean": [s["p_mean"] for s in sel if s.get("p_mean") is not None],
            }
            for group in ("cold", "warm"):  # target test AUC by user group, where the data has groups
                g = [((r["metrics"].get("target_test_groups") or {}).get(group) or {}).get("auc") for r in ok]
                if any(x is not None for x in g):
                    rows[m.name][f"auc_{group}"] = [x for x in g if x is not None]
                    rows[m.name][f"seeds_{group}"] = [r["seed"] for r, x in zip(ok, g) if x is not None]
        sweep = {}
        if spec.alpha_sweep:
            from cctl_rec.experiment.runner import model_alpha

            name, values = spec.alpha_sweep
            own = model_alpha(spec, next(m for m in spec.models if m.name == name))
            for a in values:
                want = None if a == own else a
                rs = [r for r in records if r["dataset"] == ds.name and r["model"] == name and r["alpha"] == want
                      and r["status"] == "ok"]
                sweep[f"{a:g}"] = [r["metrics"]["target_test"]["auc"] for r in rs]
        out[ds.name] = {"models": rows, "alpha_sweep": sweep}
    return out


def _paired(a: dict, b: dict, key: str = "auc") -> Optional[tuple[float, float, int, int]]:
    """(mean diff, std, wins, n) of a - b over the seeds both have (``key``: auc, auc_cold, auc_warm)."""
    sk = "seeds" if key == "auc" else "seeds_" + key.split("_", 1)[1]
    if key not in a or key not in b:
        return None
    pairs = [(x, y) for s, x in zip(a[sk], a[key]) for t, y in zip(b[sk], b[key]) if s == t]
    if not pairs:
        return None
    d = [x - y for x, y in pairs]
    m, s = _ms(d)
    return m, s, sum(x > 0 for x in d), len(d)


def fractional_ranks(score: dict[str, float]) -> dict[str, float]:
    """Rank 1 = highest score; tied scores share the mean of the places they span
    ({a: 0.7, b: 0.7, c: 0.6} -> a 1.5, b 1.5, c 3)."""
    import numpy as np

    from cctl_rec.datagen.check import average_ranks

    names = list(score)
    ranks = average_ranks(-np.array([score[n] for n in names], dtype=np.float64))
    return {n: float(r) for n, r in zip(names, ranks)}


def cross_dataset(spec: ExperimentSpec, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model over the datasets it ran on: mean of its per-dataset paired Δ AUC against the
    first reference, datasets where that mean is > 0, seed wins, and its average rank by mean test
    AUC (1 = best, among the models each dataset has; models with equal means share the mean of
    their places, so a model identical to the reference ranks with it, not behind it)."""
    ref = spec.references[0]
    out: dict[str, dict[str, Any]] = {}
    for ds, res in summary.items():
        rows = {n: r for n, r in res["models"].items() if r["auc"]}
        ranks = fractional_ranks({n: statistics.mean(r["auc"]) for n, r in rows.items()})
        for n in rows:
            o = out.setdefault(n, {"deltas": [], "ranks": [], "wins": 0, "pairs": 0, "datasets": []})
            o["ranks"].append(ranks[n])
            o["datasets"].append(ds)
            d = _paired(rows[n], rows[ref]) if ref in rows and n != ref else None
            if d:
                o["deltas"].append(d[0])
                o["wins"] += d[2]
                o["pairs"] += d[3]
    for o in out.values():
        o["mean_delta"] = statistics.mean(o["deltas"]) if o["deltas"] else None
        o["datasets_ahead"] = sum(d > 0 for d in o["deltas"])
        o["datasets_behind"] = sum(d < 0 for d in o["deltas"])
        o["avg_rank"] = statistics.mean(o["ranks"])
    return out


def markdown(spec: ExperimentSpec, summary: dict[str, Any], command: str, versions: dict[str, str],
             seconds: float, plots: list[str]) -> str:
    lines = [f"# Experiment `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    seeds = {ds.name: list(spec.seeds_of(ds)) for ds in spec.datasets}
    seed_txt = (str(list(spec.seeds)) if all(v == list(spec.seeds) for v in seeds.values()) else
                "; ".join(f"{k} {v}" for k, v in seeds.items()))
    limited = [m for m in spec.models if m.seeds]
    if limited:
        seed_txt += "; of those, " + "; ".join(f"{m.name} only {list(m.seeds)}" for m in limited)
    walls = [w for d in summary.values() for m in d["models"].values() for w in m.get("wall_seconds", [])]
    n_runs = sum(len(m["auc"]) + len(m["failed"]) for d in summary.values() for m in d["models"].values())
    compute = (f"compute time: {sum(walls) / 60:.1f} worker-min over the {len(walls)} of {n_runs} runs whose "
               f"time was recorded (each run's wall time in its worker, summed; on 2 workers about half of "
               f"it elapses)  " if walls else "compute time: not recorded  ")
    lines += [f"Command: `{command}`  ", f"Seeds: {seed_txt}, ranks per run: {spec.ranks}, "
              f"wall time of this invocation: {seconds / 60:.1f} min  ", compute,
              "Machine: " + f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}  ",
              "Packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    lines += ["Every model gets the same budget: the epochs, batch size, learning rates, embedding and "
              "tower sizes of its config (below), no per-model tuning. Target test AUC / logloss of the "
              "served network (mean ± std over seeds); Δ is paired by seed (mean ± std of the "
              "differences, and in how many seeds the model is ahead). Average rank by mean test AUC, "
              "models with equal means sharing their places.", ""]
    refs = spec.references
    xd = cross_dataset(spec, summary)
    if len(summary) > 1:
        lines += [f"## Summary across datasets (reference: {refs[0]})", "",
                  f"| model | datasets | mean Δ AUC vs {refs[0]} | datasets ahead / behind | seed wins | average rank |",
                  "|---|---|---|---|---|---|"]
        for name, o in sorted(xd.items(), key=lambda kv: kv[1]["avg_rank"]):
            md = f"{o['mean_delta']:+.4f}" if o["mean_delta"] is not None else "-"
            ahead = f"{o['datasets_ahead']} / {o['datasets_behind']} of {len(o['deltas'])}" if o["deltas"] else "-"
            wins = f"{o['wins']}/{o['pairs']}" if o["pairs"] else "-"
            lines.append(f"| {name} | {len(o['datasets'])} | {md} | {ahead} | {wins} | {o['avg_rank']:.2f} |")
        lines.append("")
    for ds, res in summary.items():
        rows = res["models"]
        groups = [g for g in ("cold", "warm") if any(f"auc_{g}" in r for r in rows.values())]
        lines += [f"## {ds}", "", "| model | test AUC | test logloss | " +
                  "".join(f"Δ AUC vs {ref} (wins) | " for ref in refs) +
                  "".join(f"{g} AUC (Δ vs {refs[0]}) | " for g in groups) +
                  "paper AUC | harmful AUROC | p_clean − p_harm | mean p | train s (load-dependent) |",
                  "|---|---|---|" + "---|" * (len(refs) + len(groups)) + "---|---|---|---|---|"]
        for name, r in rows.items():
            cells = []
            for ref in refs:
                d = _paired(r, rows[ref]) if ref in rows and name != ref else None
                cells.append(f"{d[0]:+.4f} ± {d[1]:.4f} ({d[2]}/{d[3]})" if d else "-")
            for g in groups:
                d = _paired(r, rows[refs[0]], f"auc_{g}") if refs[0] in rows and name != refs[0] else None
                cells.append(_fmt(r.get(f"auc_{g}", [])) + (f" ({d[0]:+.4f})" if d else ""))
            paper = f"{spec.paper[name]:.4f}" if name in spec.paper else "-"
            fail = f" ({len(r['failed'])} failed)" if r["failed"] else ""
            lines.append(f"| {name}{fail} | {_fmt(r['auc'])} | {_fmt(r['logloss'])} | " + " | ".join(cells) +
                         f" | {paper} | {_fmt(r['harmful_auc'], 3)} | {_fmt(r['p_clean_minus_harm'], 3)} | "
                         f"{_fmt(r['p_mean'], 3)} | {_fmt(r['train_seconds'], 0)} |")
        lines.append("")
        if spec.ablation and all(a in rows for a in spec.ablation):
            lines += ["Ablation (paired against the first):", "", "| model | test AUC | Δ vs " + spec.ablation[0] + " |",
                      "|---|---|---|"]
            first = rows[spec.ablation[0]]
            for name in spec.ablation:
                d = _paired(rows[name], first) if name != spec.ablation[0] else None
                lines.append(f"| {name} | {_fmt(rows[name]['auc'])} | "
                             f"{f'{d[0]:+.4f} ± {d[1]:.4f}' if d else '-'} |")
            lines.append("")
        if res["alpha_sweep"]:
            lines += [f"AUC vs selector.alpha ({spec.alpha_sweep[0]}):", "", "| alpha | test AUC |", "|---|---|"]
            lines += [f"| {a} | {_fmt(v)} |" for a, v in res["alpha_sweep"].items()]
            lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Configs", ""] + [f"- {m.name}: `{m.config}` {' '.join(m.overrides)}" +
                                   (f" (datasets {', '.join(m.datasets)})" if m.datasets else "")
                                   for m in spec.models]
    if spec.overrides:
        lines.append(f"- every run: {' '.join(spec.overrides)}")
    for ds in spec.datasets:
        if ds.overrides:
            lines.append(f"- {ds.name}: {' '.join(ds.overrides)}")
    return "\n".join(lines) + "\n"


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def p_histograms(run_dir: str) -> list[tuple[int, list[float], list[float]]]:
    """(step, bucket right edges, counts) of the ``selector/p`` histograms a run logged to TensorBoard.

    TensorBoard's reader takes local files only: for a run directory on a URL, the event files of
    ``RUN/tb/`` are downloaded (once, into ``CCTL_REC_CACHE``, by iopath's fsspec handler) and read
    through a temporary directory of links to them."""
    if not storage.is_remote(run_dir):
        return _p_histograms(os.path.join(run_dir, "tb"))
    import tempfile

    tb = join(run_dir, "tb")
    with tempfile.TemporaryDirectory(prefix="cctl-tb-") as tmp:
        for name in storage.find_names(tb, "*"):
            os.symlink(g_pathmgr.get_local_path(join(tb, name)), os.path.join(tmp, name))
        return _p_histograms(tmp)


def _p_histograms(tb_dir: str) -> list[tuple[int, list[float], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    if "selector/p" not in acc.Tags().get("histograms", []):
        return []
    return [(e.step, list(e.histogram_value.bucket_limit), list(e.histogram_value.bucket))
            for e in acc.Histograms("selector/p")]


def plots(spec: ExperimentSpec, records: list[dict[str, Any]], summary: dict[str, Any], out: str) -> list[str]:
    """Writes the PNGs; returns their names (relative to ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = []
    for ds in spec.datasets:
        # Fig. 5a: p histogram over training, first seed of each model that has a selector
        sel_models = [m.name for m in spec.models
                      if any(r["model"] == m.name and r["dataset"] == ds.name and r["status"] == "ok" and
                             (r["metrics"].get("selector") or {}).get("p_std", 0) > 0 and
                             not str(r["metrics"].get("model", "")).endswith(("/fixed", "/oracle"))
                             for r in records)]  # a selector that is trained and used
        if sel_models:
            fig, axes = plt.subplots(1, len(sel_models), figsize=(4 * len(sel_models), 3.2), squeeze=False)
            for ax, name in zip(axes[0], sel_models):
                r = next(r for r in records if r["model"] == name and r["dataset"] == ds.name and r["status"] == "ok"
                         and r["alpha"] is None)
                hs = p_histograms(r["run_dir"])
                if not hs:
                    continue
                grid = np.linspace(0, 1, 41)
                img = []
                for _, edges, counts in hs:
                    centres = np.clip(np.array(edges, dtype=float), 0, 1)
                    h, _ = np.histogram(centres, bins=grid, weights=np.array(counts, dtype=float))
                    img.append(h / max(h.sum(), 1))
                ax.imshow(np.array(img), aspect="auto", origin="lower", extent=(0, 1, hs[0][0], hs[-1][0]),
                          cmap="viridis")
                ax.set_xlabel("selector p")
                ax.set_ylabel("step")
                ax.set_title(f"{name} (seed {r['seed']})", fontsize=9)
            fig.suptitle(f"{ds.name}: selector p over training (Fig. 5a)", fontsize=10)
            n = f"{slug(ds.name)}-p-histogram.png"
            _save(fig, join(out, n))
            names.append(n)
        sweep = summary[ds.name]["alpha_sweep"]
        if sweep and any(sweep.values()):
            xs = [float(a) for a, v in sweep.items() if v]
            ms = [_ms(v) for v in sweep.values() if v]
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3)
            ax.set_xlabel("selector.alpha")
            ax.set_ylabel("target test AUC")
            ax.set_title(f"{ds.name}: AUC vs alpha (Fig. 5b)", fontsize=10)
            n = f"{slug(ds.name)}-auc-vs-alpha.png"
            _save(fig, join(out, n))
            names.append(n)
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        key = None
        for m in spec.models:
            rs = [r for r in records if r["model"] == m.name and r["dataset"] == ds.name and r["status"] == "ok"
                  and r["alpha"] is None and r["history"]]
            if not rs:
                continue
            key = "valid_auc" if all("valid_auc" in h for h in rs[0]["history"]) else "loss_pure"
            steps = [h["step"] for h in rs[0]["history"]]
            vals = np.array([[h.get(key, np.nan) for h in r["history"]][:len(steps)] for r in rs
                             if len(r["history"]) >= len(steps)])
            if vals.size:
                ax.plot(steps, np.nanmean(vals, axis=0), label=m.name)
        if key:
            ax.set_xlabel("step")
            ax.set_ylabel(key + (" (pure network)" if key == "loss_pure" else ""))
            ax.legend(fontsize=7)
            ax.set_title(f"{ds.name}: learning curves (mean over seeds)", fontsize=10)
            n = f"{slug(ds.name)}-learning-curves.png"
            _save(fig, join(out, n))
            names.append(n)
        else:
            plt.close(fig)
    return names


def write_report(spec: ExperimentSpec, records: list[dict[str, Any]], out: str, command: str,
                 seconds: float) -> dict[str, Any]:
    import pyarrow
    import torch
    import torchrec

    from cctl_rec import __version__

    versions = {"cctl-rec": __version__, "torch": torch.__version__, "torchrec": torchrec.__version__,
                "pyarrow": pyarrow.__version__}
    summary = summarize(spec, records)
    names = plots(spec, records, summary, out)
    results = {"experiment": spec.name, "command": command, "versions": versions, "seconds": seconds,
               "summary": summary, "cross_dataset": cross_dataset(spec, summary), "runs": [{k: v for k, v in r.items() if k != "history"} for r in records]}
    atomic_write_bytes(join(out, "results.json"), (json.dumps(results, separators=(",", ":")) + "\n").encode())
    atomic_write_bytes(join(out, "report.md"),
                       markdown(spec, summary, command, versions, seconds, names).encode())
    return results
