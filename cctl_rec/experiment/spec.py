"""An experiment: models x datasets x seeds, declared in YAML (``configs/experiments/*.yaml``).

Example::

    name: amazon
    seeds: [0, 1, 2]
    ranks: 1
    datasets:
      amazon: {path: data/amazon, prepare: [convert, amazon, --out, data/amazon]}
    overrides: [run.eval_every=100]          # every run
    models:
      - {name: DNN, config: configs/dnn_amazon.yaml}
      - {name: CCTL (paper), config: configs/cctl_amazon.yaml}
    alpha_sweep: {model: CCTL (paper), values: [0.0, 0.5, 1.0]}
    paper: {DNN: 0.7456, CCTL (paper): 0.7790}

``prepare`` holds ``cctl-rec`` arguments that create the dataset when its manifest is missing.
A dataset may set its own ``seeds`` (fewer on a large dense variant) and ``overrides`` (epochs,
source ratio: applied after the experiment's, before the model's); a model may be limited to some
datasets with ``datasets: [name or fnmatch pattern, ...]`` (the oracle where harm is known) and to
some seeds with ``seeds: [...]`` (of each dataset's seeds, those listed: fewer for a costly baseline).
``compare`` lists the models every other model is paired against by seed (default: the
baseline); the first is the reference of the cross-dataset summary (mean paired Δ, wins, rank).
Unknown keys are refused with their path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from cctl_rec.config import load_yaml


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    """fnmatch patterns of the datasets this model runs on (empty: all)."""
    seeds: tuple[int, ...] = ()
    """the seeds this model runs, among each dataset's (empty: all of them)."""

    def runs_on(self, dataset: str) -> bool:
        import fnmatch

        return not self.datasets or any(fnmatch.fnmatchcase(dataset, p) for p in self.datasets)


@dataclass(frozen=True)
class DataSpec:
    name: str
    path: str
    prepare: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    """this dataset's seeds (empty: the experiment's)."""
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    models: tuple[ModelSpec, ...]
    datasets: tuple[DataSpec, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    ranks: int = 1
    overrides: tuple[str, ...] = ()
    alpha_sweep: Optional[tuple[str, tuple[float, ...]]] = None
    paper: dict[str, float] = field(default_factory=dict)
    baseline: str = "DNN"
    ablation: tuple[str, ...] = ()
    description: str = ""
    compare: tuple[str, ...] = ()
    """models every model is paired against (empty: the baseline); the first is the summary's reference."""

    def seeds_of(self, ds: DataSpec, model: Optional[ModelSpec] = None) -> tuple[int, ...]:
        """The seeds ``ds`` runs (its own, else the experiment's); with ``model``, those of them the
        model runs."""
        seeds = ds.seeds or self.seeds
        return tuple(s for s in seeds if s in model.seeds) if model is not None and model.seeds else seeds

    @property
    def references(self) -> tuple[str, ...]:
        return self.compare or (self.baseline,)


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, (str, int, float)) for x in v):
        raise ValueError(f"{where}: expected a list of strings, got {v!r}")
    return tuple(str(x) for x in v)


def _seeds(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in v):
        raise ValueError(f"{where} must be a non-empty list of integers >= 0, got {v!r}")
    return tuple(v)


def _keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return d


def load_spec(path: str) -> ExperimentSpec:
    """Reads and checks an experiment YAML (configs paths must exist; names unique)."""
    d = _keys(load_yaml(path), {"name", "description", "seeds", "ranks", "datasets", "overrides", "models",
                                "alpha_sweep", "paper", "baseline", "ablation", "compare"}, path)
    for k in ("name", "models", "datasets"):
        if k not in d:
            raise ValueError(f"{path}: missing key {k!r}")
    models = []
    for i, m in enumerate(d["models"] or []):
        m = _keys(m, {"name", "config", "overrides", "datasets", "seeds"}, f"{path}: models[{i}]")
        if "name" not in m or "config" not in m:
            raise ValueError(f"{path}: models[{i}] needs name and config, got {sorted(m)}")
        if not os.path.exists(m["config"]):
            raise FileNotFoundError(f"{path}: models[{i}] ({m['name']}): config {m['config']} does not exist")
        models.append(ModelSpec(str(m["name"]), str(m["config"]), _strs(m.get("overrides"), f"models[{i}].overrides"),
                                _strs(m.get("datasets"), f"models[{i}].datasets"),
                                _seeds(m["seeds"], f"{path}: models[{i}].seeds") if "seeds" in m else ()))
    if not models:
        raise ValueError(f"{path}: models must list at least one model")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: model names must be unique, got {names}")
    datasets = []
    for name, ds in (d["datasets"] or {}).items():
        ds = _keys(ds, {"path", "prepare", "seeds", "overrides"}, f"{path}: datasets.{name}")
        if "path" not in ds:
            raise ValueError(f"{path}: datasets.{name} needs a path")
        ds_seeds = _seeds(ds.get("seeds"), f"{path}: datasets.{name}.seeds") if "seeds" in ds else ()
        datasets.append(DataSpec(str(name), str(ds["path"]), _strs(ds.get("prepare"), f"datasets.{name}.prepare"),
                                 ds_seeds, _strs(ds.get("overrides"), f"datasets.{name}.overrides")))
    if not datasets:
        raise ValueError(f"{path}: datasets must name at least one dataset")
    seeds = _seeds(d.get("seeds", [0, 1, 2]), f"{path}: seeds")
    ranks = d.get("ranks", 1)
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"{path}: ranks must be an integer >= 1, got {ranks!r}")
    sweep = None
    if d.get("alpha_sweep"):
        a = _keys(d["alpha_sweep"], {"model", "values"}, f"{path}: alpha_sweep")
        if a.get("model") not in names:
            raise ValueError(f"{path}: alpha_sweep.model {a.get('model')!r} is not one of the models {names}")
        vals = a.get("values") or []
        if not vals or not all(isinstance(v, (int, float)) and v >= 0 for v in vals):
            raise ValueError(f"{path}: alpha_sweep.values must be numbers >= 0, got {vals!r}")
        sweep = (str(a["model"]), tuple(float(v) for v in vals))
    paper = d.get("paper") or {}
    if not isinstance(paper, dict) or not all(isinstance(v, (int, float)) for v in paper.values()):
        raise ValueError(f"{path}: paper must map model names to numbers, got {paper!r}")
    for m in models:
        if m.datasets and not any(m.runs_on(ds.name) for ds in datasets):
            raise ValueError(f"{path}: model {m.name!r}: datasets {list(m.datasets)} match none of "
                             f"{[ds.name for ds in datasets]}")
        if m.seeds and not any(set(m.seeds) & set(ds.seeds or seeds) for ds in datasets if m.runs_on(ds.name)):
            raise ValueError(f"{path}: model {m.name!r}: seeds {list(m.seeds)} are none of its datasets' seeds")
    compare = _strs(d.get("compare"), "compare")
    for c in compare:
        if c not in names:
            raise ValueError(f"{path}: compare names {c!r}, which is not one of the models {names}")
    ablation = _strs(d.get("ablation"), "ablation")
    for a in ablation:
        if a not in names:
            raise ValueError(f"{path}: ablation names {a!r}, which is not one of the models {names}")
    return ExperimentSpec(name=str(d["name"]), models=tuple(models), datasets=tuple(datasets), seeds=tuple(seeds),
                          ranks=ranks, overrides=_strs(d.get("overrides"), "overrides"), alpha_sweep=sweep,
                          paper={str(k): float(v) for k, v in paper.items()},
                          baseline=str(d.get("baseline", "DNN")), ablation=ablation,
                          description=str(d.get("description", "")), compare=compare)


def slug(name: str) -> str:
    """A directory name for a model or dataset name."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")
