"""Property-based bad input (issue #20): hypothesis generates hostile configs and manifests and
``cctl-rec train`` must keep its promise on every one of them.

The promise: exit 0 or 2; on exit 2 exactly one error line on stderr (at most ~1000 characters),
no traceback, and no run directory; never a hang (each case within a time bound). The training
itself is replaced by a stub: the property is that everything a run can be refused for is found
before it starts (config, dataset, run directory), so a case that passes the checks is handed to
training with nothing written but the run directory's lock. Cases are derandomized (the same
``N_CASES`` inputs every run, no example database written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import typing

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cctl_rec.cli import main  # noqa: E402
from cctl_rec.config import TrainConfig  # noqa: E402

N_CASES = 100
"""Generated inputs per property (configs, manifests): docs/reliability.md reports them."""
CASE_SECONDS = 20.0
"""No case may take longer (the alias bomb took > 90 s before it was bounded)."""

SETTINGS = settings(max_examples=N_CASES, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))
rel = pytest.mark.reliability


def _keys() -> list[str]:
    """Every dotted config key (``selector.alpha`` ...)."""
    out = []
    for sec in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(typing.get_type_hints(TrainConfig)[sec.name]):
            out.append(f"{sec.name}.{f.name}")
    return out


KEYS = _keys()
SCALARS = st.one_of(
    st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=40), st.sampled_from(["paper", "cuda", "row_wise", "fp16", "mlp",
                                                                     "1e-3", "0x10", ".nan", "~", "[]", "{}"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _hint(key: str):
    sec, name = key.split(".")
    return typing.get_type_hints(typing.get_type_hints(TrainConfig)[sec])[name]


def typed_values(key: str):
    """Values of the key's own type, around and beyond its range (the cases that pass the type
    check and must still be refused, or run)."""
    tp = _hint(key)
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(list(typing.get_args(tp)) + ["", "auto "])
    if typing.get_origin(tp) is tuple:
        return st.lists(st.one_of(st.integers(-2, 70_000), st.floats(-5, 5)), max_size=5)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(-3, 3), st.integers(-10, 5000), st.sampled_from([2 ** 31, 2 ** 62, 2 ** 63]))
    if tp is float:
        return st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 1e-9, 1e300, -0.0, 0.5]))
    return st.text(max_size=10)


def _bomb(depth: int, width: int, leaf: str) -> str:
    """A YAML alias bomb: width^depth copies of ``leaf`` in a few hundred bytes."""
    lines = [f"a0: &a0 [{', '.join([repr(leaf)] * width)}]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


@st.composite
def configs(draw) -> tuple[str, list[str]]:
    """(config file text, overrides): real keys with hostile values, unknown keys, raw text, bombs."""
    kind = draw(st.sampled_from(["mapping", "mapping", "text", "bomb"]))
    if kind == "text":
        text = draw(st.text(max_size=200))
    else:
        doc: dict = {}
        for key in draw(st.lists(st.sampled_from(KEYS + ["run.nope", "selector.gama", "x.y"]), max_size=4)):
            sec, name = key.split(".", 1)
            typed = key in KEYS and draw(st.booleans())
            doc.setdefault(sec, {})[name] = draw(typed_values(key) if typed else VALUES)
        text = yaml.safe_dump(doc)
        if kind == "bomb":
            sec, name = draw(st.sampled_from(KEYS)).split(".")
            depth = draw(st.integers(2, 9))
            text = _bomb(depth, draw(st.integers(2, 9)), draw(st.text(max_size=20))) + \
                f"\n{sec}:\n  {name}: *a{depth - 1}\n"
    overrides = []
    flow = lambda v: yaml.safe_dump(v, default_flow_style=True).strip().replace("\n", " ")  # noqa: E731
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3)):
        raw = draw(st.one_of(st.text(max_size=30), VALUES.map(flow), typed_values(key).map(flow)))
        overrides.append(f"{key}={raw}")
    return text, overrides


def _stub_train(cfg, run_dir):  # what train would be handed: the checks before it are the property
    return {"model": cfg.model.name, "steps": 0, "world_size": 1, "target_test": None, "target_valid": None,
            "selector": None, "train_samples_per_s": 0.0}


def _check_promise(capsys, argv: list[str], run: str) -> int:
    t0 = time.monotonic()
    rc = main(argv)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert took < CASE_SECONDS, (took, argv[-3:])
    assert rc in (0, 2), (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith("cctl-rec train: error: ")]
        assert len(lines) == 1 and len(lines[0]) <= 1100, err[-2000:]
        assert not os.path.exists(run), f"a refused run left {run}: {lines[0]}"
    else:
        assert set(os.listdir(run)) <= {".lock"}, os.listdir(run)  # nothing half-written before training
    return rc


@rel("config", "hostile configs, property-based (#20)", expect=f"hypothesis, {N_CASES} derandomized cases: config "
     "files (real keys with hostile values: huge / negative ints, NaN, strings, nested lists and maps; unknown keys; "
     "raw text; YAML alias bombs in any field) and overrides: exit 0 or 2, on 2 one line and no run directory, no "
     f"traceback, each case under {CASE_SECONDS:.0f} s")
def test_hostile_configs(tiny_data, tmp_path, capsys, monkeypatch):
    import cctl_rec.train.loop as loop

    monkeypatch.setattr(loop, "train", _stub_train)
    seen = []

    @SETTINGS
    @given(configs())
    def prop(case):
        text, overrides = case
        d = tempfile.mkdtemp(dir=tmp_path)
        with open(os.path.join(d, "c.yaml"), "w", encoding="utf-8") as f:
            f.write(text)
        run = os.path.join(d, "run")
        seen.append(_check_promise(capsys, ["train", "--config", os.path.join(d, "c.yaml"), "--run-dir", run,
                                            *overrides, f"data.path={tiny_data}"], run))

    prop()
    assert len(seen) == N_CASES and 2 in seen, seen


# ----------------------------------------------------------------------------- manifests


def _paths(obj, prefix=()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _set(obj, path, value, delete=False):
    if not path:
        return value
    node = obj
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


JSON = st.recursive(st.one_of(st.integers(-2 ** 64, 2 ** 64), st.floats(allow_nan=False), st.booleans(), st.none(),
                              st.text(max_size=30)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)


@st.composite
def manifest_edits(draw, base: dict) -> dict:
    """The tiny dataset's manifest with 1-3 hostile edits: a feature's cardinality or table, a
    shard's path / rows / bytes / sha256, any value replaced by any JSON value, or a key deleted."""
    m = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["cardinality", "table", "shard", "shard", "json", "delete"]))
        if how in ("cardinality", "table"):
            feats = m["schema"][draw(st.sampled_from(["src", "tgt"]))]["features"]
            f = feats[draw(st.integers(0, len(feats) - 1))]
            f[how] = draw(st.one_of(st.integers(-2, 400), st.sampled_from([10 ** 6, 10 ** 13, 2 ** 63]))
                          if how == "cardinality" else
                          st.sampled_from(["item_id", "user_id", "category", "brand", "seq", "nope", ""]))
            continue
        if how == "shard":
            split = draw(st.sampled_from(sorted(m["splits"])))
            entry = m["splits"][split][draw(st.integers(0, len(m["splits"][split]) - 1))]
            key = draw(st.sampled_from(["path", "rows", "bytes", "sha256", "drop-bytes"]))
            if key == "drop-bytes":
                entry.pop("bytes", None)
            elif key == "path":
                entry["path"] = draw(st.sampled_from(["../x.parquet", "/dev/zero", "tgt/test/part-00000.parquet",
                                                      "src/train/part-00001.parquet", "tgt", "", "tgt/../tgt"]))
            elif key == "sha256":
                entry["sha256"] = draw(st.sampled_from(["", "0" * 64, "Z" * 64, "0" * 63]))
            else:
                entry[key] = draw(st.one_of(st.integers(-1, 10 ** 7), st.sampled_from([0, 2 ** 63])))
            continue
        paths = [p for p in _paths(m) if p]
        path = draw(st.sampled_from(paths))
        m = _set(m, path, None, delete=True) if how == "delete" else _set(m, path, draw(JSON))
    return m


@rel("data", "hostile manifests, property-based (#20)", expect=f"hypothesis, {N_CASES} derandomized cases: the tiny "
     "dataset's manifest.json with 1-3 hostile edits (any value replaced by any JSON value, keys deleted, "
     "cardinalities / tables / shard paths / sizes changed): exit 0 or 2, on 2 one line and no run directory, no "
     f"traceback, each case under {CASE_SECONDS:.0f} s")
def test_hostile_manifests(tiny_data, tmp_path, capsys, monkeypatch):
    import cctl_rec.train.loop as loop

    monkeypatch.setattr(loop, "train", _stub_train)
    with open(os.path.join(tiny_data, "manifest.json")) as f:
        base = json.load(f)
    seen = []

    @SETTINGS
    @given(manifest_edits(base))
    def prop(m):
        d = tempfile.mkdtemp(dir=tmp_path)
        data = os.path.join(d, "data")
        os.mkdir(data)
        for dom in ("src", "tgt"):
            os.symlink(os.path.join(tiny_data, dom), os.path.join(data, dom))
        with open(os.path.join(data, "manifest.json"), "w") as f:
            json.dump(m, f)
        run = os.path.join(d, "run")
        seen.append(_check_promise(capsys, ["train", "--data", data, "--run-dir", run, "data.batch_size=128",
                                            "run.max_eval_rows=512"], run))

    prop()
    assert len(seen) == N_CASES and 2 in seen, seen
