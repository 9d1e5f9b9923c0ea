"""What every benchmark shares: options, timing statistics, memory, machine and package facts,
and the JSON + markdown writer.

Timings on a shared machine are noisy: benchmarks alternate their variants in one process and
report the median with min and max over repeats. The load average is sampled during each run
(it includes the benchmark's own threads), so a result says whether other jobs were running.

Example::

    opts = BenchOptions(data="data/small", steps=40)
    with LoadSampler() as load:
        ...
    write_results("docs/benchmarks/train.json", envelope("train", opts, results, load), markdown)
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from cctl_rec.data.manifest import atomic_write_bytes

logger = logging.getLogger(__name__)


MIN_WINDOWS = 20
"""Syncs and selector updates a stress run must reach (the design card's stress)."""


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """Options shared by the benchmarks (``cctl-rec bench --help`` documents each).

    Attributes:
        data: dataset root (``cctl-rec datagen`` output).
        config: training config the benchmarks start from (batch, tower, k, selector window).
        overrides: ``a.b=v`` config overrides applied after ``config``.
        steps: measured steps per variant and round.
        warmup: unmeasured steps before measuring (first-step allocations, planner caches).
        repeats: rounds; variants alternate within a round.
        threads: torch intra-op threads (0: torch's default).
        auc_steps: train: steps of the fp32-vs-bf16 AUC runs (0: one full pass; -1: skip).
        table_rows: sync: target user-table sizes.
        world_sizes: scaling: gloo world sizes.
        stress_steps: stress: the run's length.
        stress_warmup: stress: steps before the RSS flatness window (0: a third of the run).
        sync_every, update_every: stress: k and the selector window (0: stress_steps / 25).
        rss_every: stress: steps between two RSS samples.
        stress_world: stress: gloo ranks (1: this process; more: spawned, every rank checked).
        preset, scale_ids: stress: the datagen preset the data was generated from and the factor of its id
            spaces and sample counts (``--preset meituan --scale-ids F``; recorded in the results). With a
            preset, ``sync_every`` and ``update_every`` must be given (> 0) and ``stress_steps`` must hold
            20 of each.
        seed: run.seed of every model built.
    """

    data: str = "data/small"
    config: Optional[str] = "configs/cctl_small.yaml"
    overrides: tuple[str, ...] = ()
    steps: int = 40
    warmup: int = 5
    repeats: int = 3
    threads: int = 0
    auc_steps: int = 0
    table_rows: tuple[int, ...] = (1_000_000, 10_000_000, 50_000_000)
    world_sizes: tuple[int, ...] = (1, 2)
    stress_steps: int = 1000
    stress_warmup: int = 0
    sync_every: int = 0
    update_every: int = 0
    rss_every: int = 10
    stress_world: int = 1
    preset: Optional[str] = None
    scale_ids: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "repeats", "rss_every", "stress_steps", "stress_world"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "threads", "sync_every", "update_every", "stress_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"bench --{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.auc_steps < -1:
            raise ValueError(f"bench --auc-steps must be -1 (skip), 0 (one pass) or > 0, got {self.auc_steps}")
        if not self.table_rows or min(self.table_rows) < 1:
            raise ValueError(f"bench --table-rows must list sizes >= 1, got {list(self.table_rows)}")
        if not self.world_sizes or min(self.world_sizes) < 1:
            raise ValueError(f"bench --world-sizes must list sizes >= 1, got {list(self.world_sizes)}")
        if (self.preset is None) != (self.scale_ids is None):
            raise ValueError(f"bench stress --preset and --scale-ids go together (the preset and the factor of its "
                             f"id spaces), got --preset {self.preset} --scale-ids {self.scale_ids}")
        if self.preset is not None:
            if not (isinstance(self.scale_ids, (int, float)) and math.isfinite(self.scale_ids)
                    and self.scale_ids > 0):
                raise ValueError(f"bench stress --scale-ids must be a finite number > 0, got {self.scale_ids}")
            window = max(self.sync_every, self.update_every)
            if min(self.sync_every, self.update_every) < 1 or self.stress_steps < MIN_WINDOWS * window:
                raise ValueError(
                    f"bench stress --preset: --stress-steps {self.stress_steps} holds "
                    f"{self.stress_steps // max(1, self.sync_every)} syncs (k = {self.sync_every}) and "
                    f"{self.stress_steps // max(1, self.update_every)} selector updates (window "
                    f"{self.update_every}); expected at least {MIN_WINDOWS} of each: --stress-steps >= "
                    f"{MIN_WINDOWS * max(1, window)}")


def train_config(opts: BenchOptions, *extra: str) -> Any:
    """The TrainConfig a benchmark runs: ``opts.config`` + data path + ``opts.overrides`` + ``extra``."""
    from cctl_rec.config import load_config

    # the paper's selector unless a benchmark says otherwise: its REINFORCE bookkeeping is the costliest
    # selector path, and the numbers in docs/benchmarks/ were taken with it
    over = [f"data.path={opts.data}", f"run.seed={opts.seed}", "selector.mode=paper", *opts.overrides, *extra]
    if opts.threads:
        over.append(f"run.threads={opts.threads}")
    return load_config(opts.config, over)


# ----------------------------------------------------------------------------- statistics


def summary(xs: Sequence[float], nd: int = 6) -> dict[str, Any]:
    """{median, min, max, n} of ``xs`` (None values when empty)."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(xs), nd), "min": round(min(xs), nd), "max": round(max(xs), nd),
            "n": len(xs)}


def rate_summary(count: float, seconds: Sequence[float], nd: int = 1) -> dict[str, Any]:
    """count / t for each t, as {median, min, max, n} (min rate from the max time)."""
    return summary([count / s for s in seconds if s > 0], nd)


class Sections:
    """Per-step named durations: ``with sections.span("forward"): ...`` or ``add(name, seconds)``.

    ``new_step()`` starts a step; ``steps`` is the list of {name: seconds} dicts.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.stack: list[str] = []
        """The spans open now, outermost first (the scaling benchmark tags collectives with them)."""

    def new_step(self) -> None:
        self.cur = {}
        self.steps.append(self.cur)

    def add(self, name: str, seconds: float) -> None:
        self.cur[name] = self.cur.get(name, 0.0) + seconds

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            self.add(name, time.perf_counter() - t0)

    def medians(self, last: Optional[int] = None, nd: int = 6) -> dict[str, dict[str, Any]]:
        """{name: summary over the (last ``last``) steps}; a name missing in a step counts 0 there."""
        steps = self.steps[-last:] if last else self.steps
        names = sorted({k for s in steps for k in s})
        return {k: summary([s.get(k, 0.0) for s in steps], nd) for k in names}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- memory


def rss_mib() -> float:
    """Current resident set size of this process (``/proc/self/statm``), MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM in ``/proc/self/status``; ``getrusage`` elsewhere), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 1024.0


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS to its current RSS (Linux >= 4.0: ``/proc/self/clear_refs``
    5), so :func:`peak_rss_mib` then measures a phase; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- machine and versions


def machine_info() -> dict[str, Any]:
    """CPU model, vCPUs, vector ISA flags, memory and kernel."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "vcpus": os.cpu_count(), "cpu_model": platform.processor() or None}
    try:
        info["vcpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name") and info.get("cpu_model") in (None, "", "x86_64"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")) or f in ("f16c",))
                info["avx512"] = any(f.startswith("avx512") for f in flags)
                info["bf16_native"] = bool({"avx512_bf16", "amx_bf16"} & flags)
                break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def versions() -> dict[str, Optional[str]]:
    """Package versions and the code's git commit (``+dirty`` with uncommitted changes)."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for name in ("torch", "fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec", "numpy", "pyarrow", "torchmetrics",
                 "cctl-rec"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git"] = (sha + ("+dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a daemon thread.

    The load includes this process's own threads; ``summary()`` gives start, end, median and max.
    """

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.t0 = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self.t0 = time.time()
        self.samples = [os.getloadavg()[0]]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        n = os.cpu_count() or 1
        med = statistics.median(self.samples)
        return {"load_1m_start": self.samples[0], "load_1m_end": self.samples[-1],
                "load_1m_median": round(med, 2), "load_1m_max": max(self.samples), "vcpus": n,
                "seconds": round(time.time() - self.t0, 1),
                "note": (f"shared machine: median load {med:.1f} on {n} vCPUs (this benchmark's own threads "
                         f"count up to {n}); other jobs were running" if med > n + 0.5 else
                         f"median load {med:.1f} on {n} vCPUs")}


COMMAND: Optional[list[str]] = None
"""The command line recorded in results (``cctl-rec bench`` sets it; else ``sys.argv``)."""


def envelope(name: str, opts: Optional[BenchOptions], results: dict[str, Any], load: LoadSampler,
             targets: Optional[list[dict[str, Any]]] = None, argv: Optional[Sequence[str]] = None
             ) -> dict[str, Any]:
    """The JSON every benchmark writes: what was run, on what, under which load, and the results."""
    cmd = list(argv) if argv is not None else COMMAND or ["cctl-rec", *sys.argv[1:]]
    return {"benchmark": name, "command": " ".join(shlex.quote(c) for c in cmd),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": _jsonable(asdict(opts)) if opts is not None else None,
            "machine": machine_info(), "versions": versions(), "load": load.summary(),
            "targets": targets or [], "results": _jsonable(results)}


def target(name: str, goal: str, value: Any, met: Optional[bool], note: str = "", required: bool = False
           ) -> dict[str, Any]:
    """One target line: its name, the goal in words, the measured value, met (None: not measurable).
    ``required``: a failure is an error (``cctl-rec bench`` exits 1), not just a target missed."""
    return {"name": name, "goal": goal, "value": value, "met": met, "note": note, "required": required}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    return x


# ----------------------------------------------------------------------------- writing


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_stat(s: Optional[dict[str, Any]], scale: float = 1.0, nd: int = 1, unit: str = "") -> str:
    """'median (min–max)' of a summary dict, scaled (e.g. 1e3 for ms)."""
    if not s or s.get("median") is None:
        return "n/a"
    f = lambda v: f"{v * scale:,.{nd}f}"  # noqa: E731
    return f"{f(s['median'])}{unit} ({f(s['min'])}–{f(s['max'])})"


def header_md(res: dict[str, Any], title: str) -> str:
    m, v, ld = res["machine"], res["versions"], res["load"]
    isa = ", ".join(m.get("isa", [])) or "n/a"
    lines = [f"# {title}", "", f"`{res['command']}`", "",
             f"- machine: {m.get('cpu_model')}, {m.get('vcpus')} vCPUs ({isa}; native bf16: "
             f"{'yes' if m.get('bf16_native') else 'no'}), {m.get('mem_gib')} GiB"
             + (f", GPU {m['cuda']}" if m.get("cuda") else ""),
             f"- versions: torch {v.get('torch')}, fbgemm {v.get('fbgemm-gpu-cpu') or v.get('fbgemm-gpu')}, "
             f"torchrec {v.get('torchrec')}, pyarrow {v.get('pyarrow')}, cctl-rec {v.get('cctl-rec')} "
             f"(git {v.get('git')})",
             f"- load: {ld['note']} (1-min load start {ld['load_1m_start']:.1f}, max {ld['load_1m_max']:.1f}); "
             f"{ld['seconds']:.0f} s; finished {res['finished_at']}", ""]
    if res.get("targets"):
        lines += ["Targets:", "", md_table(["target", "goal", "measured", "met", "note"],
                                            [[t["name"], t["goal"], t["value"], t["met"], t["note"]]
                                             for t in res["targets"]]), ""]
    return "\n".join(lines)


def md_path(out: str) -> str:
    """The markdown file beside a JSON output: x.json -> x.md (else x + .md)."""
    return out[:-5] + ".md" if out.endswith(".json") else out + ".md"


def write_results(out: Optional[str], res: dict[str, Any], markdown: str) -> None:
    """Writes ``res`` as JSON to ``out`` and ``markdown`` beside it, both atomically (temp, rename)."""
    if not out:
        return
    d = os.path.dirname(out)
    if d:
        os.makedirs(d, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(res, indent=2) + "\n").encode())
    atomic_write_bytes(md_path(out), (markdown.rstrip() + "\n").encode())
    logger.info("wrote %s and %s", out, md_path(out))


def finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def spawn_pool(workers: int = 1) -> Any:
    """A ProcessPoolExecutor of fresh interpreters (spawn): a child's peak RSS is its own."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
