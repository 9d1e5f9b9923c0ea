"""The serving artifact: the pure network only (§3.4), unsharded, in plain PyTorch.

``ServingModel`` needs neither TorchRec nor fbgemm: one ``nn.EmbeddingBag``-equivalent table per
target table and the SCN tower, fed padded id tensors, so it exports with ``torch.export``.
The artifact directory holds the weights once and nothing that names the training machine:

- ``model.pt``: the state dict (tensors only, loaded with ``weights_only=True``), the one copy of
  the weights;
- ``program.pt2``: the ``torch.export`` program with the weights as its first inputs (no weights
  inside), ``program(weights, ids, seq, seq_len)``, ``weights`` the tuple of ``model.pt``'s tensors
  in ``serving.json``'s ``weights`` order;
- ``model.aoti.pt2`` (``export --aoti``): that program compiled by AOTInductor
  (``aoti_compile_and_package``) for a C++ server (``docs/serving.md``), same inputs;
- ``features/`` when the training data was written by ``cctl-rec prepare``: its raw-id -> row
  mapping (``features.json`` and the vocabularies) and the dense features' train mean / std, so
  ``predict`` takes raw ids and raw numbers, an id never seen in training lands on the reserved
  row 0 and a float is standardised as in training (``serving.json`` ``dense`` repeats the mean /
  std for a server of its own);
- ``serving.json`` (written last): schema, inputs, weight order, files and sizes, the run's name
  and step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import typing
import uuid
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from torch.distributed.checkpoint.api import CheckpointException

from pydantic import BaseModel, ConfigDict, Field

from cctl_rec.config import ModelConfig
from cctl_rec.data.manifest import DomainSchemaJSON, atomic_write_bytes, check_schema_tables
from cctl_rec.modules.heads import build_head
from cctl_rec.safe_io import decode_json, read_bounded, regular_file, short, validate
from cctl_rec.schema import HEAD_SEQUENCES, TOKENS, DomainSchema
from cctl_rec.storage import dcp_reader
from cctl_rec.train.checkpoint import check_metadata, dcp_cause, first_line

logger = logging.getLogger(__name__)

FORMAT = "cctl-rec-serving/v1"
FILES = ("model.pt", "serving.json")
MAX_SERVING_JSON_BYTES = 16 << 20


class ServingJSON(BaseModel):
    """serving.json: what ``load_artifact`` builds the model from is typed and bounded."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["cctl-rec-serving/v1"]
    schema_: DomainSchemaJSON = Field(alias="schema")
    embedding_dim: int = Field(gt=0, le=1 << 16)
    tower: list[Annotated[int, Field(gt=0, le=1 << 16)]] = Field(min_length=1, max_length=64)
    head: typing.get_type_hints(ModelConfig)["head"] = "mlp"  # type: ignore[valid-type]
    max_seq_len: int = Field(gt=0, le=1 << 16)


class ServingModel(nn.Module):
    """The pure network: target tables + SCN tower. ``forward(ids, seq, seq_len) -> logits``
    (MiNet: ``forward(ids, seq, seq_len, other_seq, other_len)``; a schema with dense features:
    ``forward(ids, seq, seq_len, dense)``; :attr:`inputs` names them).

    Args:
        schema: the target domain's schema.
        dim: embedding width (``model.embedding_dim``; a feature with a ``dim`` of its own has that).
        tower: the tower's hidden widths.
        head: the tower's architecture (``model.head``).

    Inputs:
        ids: B X F_single int64, the single-id features in ``single_features`` order.
        seq: B X L int64, the behaviour sequence, left-aligned, padded with any valid id.
        seq_len: B int64, the number of valid items in each row (mean pooling, or sum when the item
            table's ``pooling`` is sum; 0 -> zeros).
        other_seq, other_len: the same for ``other_seq`` (the user's recent source-domain items,
            looked up in the target item table), for heads that read it (:attr:`inputs`).
        bags, bag_len: B X M X L int64 and B X M int64, the schema's M multi-valued features
            (``schema.multi_features`` order), each padded like ``seq`` (left-aligned, any valid id
            as padding) and pooled as its table says; only when M > 0.
        dense: B X F_dense float32, the standardised dense features in ``schema.dense`` order.
    """

    def __init__(self, schema: DomainSchema, dim: int, tower: tuple[int, ...], head: str = "mlp") -> None:
        super().__init__()
        self.schema, self.dim = schema, dim
        widths = schema.table_dims(dim)  # dim, unless a feature says otherwise
        self.tables = nn.ParameterDict({name[2:]: nn.Parameter(torch.zeros(rows, widths[name]))
                                        for name, rows, _ in schema.tables()})
        self.single_features = [f.name for f in schema.features if not f.is_list]
        self.bags = schema.multi_features
        self.table_of = {f.name: f.table for f in schema.features}
        self.pooling = {f.name: f.pooling for f in schema.features}
        self.order = schema.field_names()
        self.head, self.hidden = head, tuple(tower)
        self.sequences = HEAD_SEQUENCES.get(head, ())
        self.tokens = [(t, [k[len(schema.prefix):] for k in schema.token_features(t)], schema.token_dense(t))
                       for t in TOKENS]
        width = sum(schema.token_width(t, dim) for t in TOKENS)
        self.tower = build_head(head, width, dim, tower, fields={n: i for i, n in enumerate(self.order)})

    @property
    def inputs(self) -> list[str]:
        """The names of ``forward``'s inputs, in order."""
        return (["ids", "seq", "seq_len"] + (["other_seq", "other_len"] if "other_seq" in self.sequences else [])
                + (["bags", "bag_len"] if self.bags else []) + (["dense"] if self.schema.dense else []))

    def forward(self, ids: torch.Tensor, seq: torch.Tensor, seq_len: torch.Tensor, *extra: torch.Tensor
                ) -> torch.Tensor:
        """``extra``: the inputs after ``seq_len`` in :attr:`inputs` order (``other_seq, other_len``,
        ``bags, bag_len`` and / or ``dense``)."""
        other_seq = other_len = dense = None
        if "other_seq" in self.sequences:
            other_seq, other_len = extra[0], extra[1]
        if self.schema.dense:
            dense = extra[-1]
        pooled = {}
        for j, name in enumerate(self.single_features):
            pooled[name] = self.tables[self.table_of[name]][ids[:, j]]                        # B X D
        emb, mask = self._positions(seq, seq_len)                                             # B X L X D, B X L
        pooled["seq"] = self._pool(emb, mask, seq_len, self.pooling["seq"])
        if self.bags:  # after other_seq / other_len when the head reads them
            at = 2 if "other_seq" in self.sequences else 0
            bags, bag_len = extra[at], extra[at + 1]                                          # B X M X L, B X M
            for m, name in enumerate(self.bags):
                e = self.tables[self.table_of[name]][bags[:, m]]                              # B X L X D
                keep = torch.arange(bags.shape[2]).unsqueeze(0) < bag_len[:, m].unsqueeze(1)  # B X L
                pooled[name] = self._pool(e, keep, bag_len[:, m], self.pooling[name])
        if dense is None:
            x = torch.cat([pooled[n] for n in self.order], dim=1)
        else:  # each token: its pooled embeddings, then its dense floats (CCTL's tower input)
            x = torch.cat([p for _, names, idx in self.tokens
                           for p in [pooled[n] for n in names] + ([dense[:, idx]] if idx else [])], dim=1)
        heads: list[torch.Tensor] = []
        for column in self.sequences:  # the head's per-position inputs, as CCTL.target_inputs gives them
            if column == "seq":
                heads += [emb, mask]
            else:
                assert other_seq is not None and other_len is not None, f"model.head={self.head} reads other_seq"
                heads += list(self._positions(other_seq, other_len))
        return self.tower(x, *heads)

    @staticmethod
    def _pool(emb: torch.Tensor, mask: torch.Tensor, length: torch.Tensor, pooling: str) -> torch.Tensor:
        """B X D: the masked sum of ``emb`` (B X L X D) over L, divided by ``length`` (B; 0 -> zeros)
        unless ``pooling`` is sum (TorchRec's SUM / MEAN bag)."""
        total = (emb * mask.unsqueeze(-1).to(emb.dtype)).sum(1)
        return total if pooling == "sum" else total / length.clamp_min(1).unsqueeze(1).to(emb.dtype)

    def _positions(self, seq: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item-table embeddings B X L X D and the B X L bool mask of a padded sequence."""
        emb = self.tables[self.table_of["seq"]][seq]
        return emb, torch.arange(seq.shape[1]).unsqueeze(0) < seq_len.unsqueeze(1)


def load_network_from_checkpoint(ckpt: str, schema: DomainSchema, dim: int, tower: tuple[int, ...],
                                 network: str, head: str = "mlp") -> ServingModel:
    """Reads one network's target tables and tower (``network`` = "mixed" or "pure") out of a DCP
    training checkpoint into an unsharded :class:`ServingModel` (no process group needed)."""
    model = ServingModel(schema, dim, tower, head)
    flat: dict[str, torch.Tensor] = {}
    for name, _, _ in schema.tables():
        flat[f"model/{network}_tgt.embedding_bags.{name}.weight"] = model.tables[name[2:]].data
    for k, v in model.tower.state_dict().items():
        flat[f"model/{network}_tower.{k}"] = v
    check_metadata(ckpt)
    try:
        dcp.load(flat, checkpoint_id=ckpt, no_dist=True, storage_reader=dcp_reader(ckpt))
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error
        raise ValueError(f"checkpoint {ckpt} does not hold the {network} network of this model "
                         f"({first_line(dcp_cause(e))})") from None
    model.tower.load_state_dict({k[len(f"model/{network}_tower."):]: v for k, v in flat.items()
                                 if k.startswith(f"model/{network}_tower.")})
    return model.eval()


def _check_out(out: str) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise NotADirectoryError(f"--out {out} exists and is not a directory; expected a new or export directory")
        if os.listdir(out) and not os.path.exists(os.path.join(out, "serving.json")):
            raise FileExistsError(f"--out {out} is a non-empty directory without serving.json; expected a new "
                                  f"directory or an earlier export to replace")


def save_artifact(model: ServingModel, out: str, info: dict[str, Any], max_seq_len: int,
                  data_root: Optional[str] = None, aoti: bool = False) -> dict[str, Any]:
    """Writes model.pt, program.pt2 (with ``aoti`` model.aoti.pt2), the feature map of
    ``data_root`` when it has one, and serving.json into ``out``; returns serving.json.

    The files go into a hidden temp directory next to ``out``, renamed to ``out`` once complete:
    a failed export (full disk, a kill) leaves ``out`` as it was. An existing ``out`` is replaced
    only if it is empty or an earlier export.
    """
    if "://" in out:
        return _save_remote(model, out, info, max_seq_len, data_root, aoti)
    out = os.path.normpath(out)
    _check_out(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        meta = _write_artifact(model, tmp, info, max_seq_len, data_root, aoti)
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError)):
            raise OSError(e.errno, f"{e.strerror or e} while writing the export {out}; it was not written and "
                          f"{out} is as it was") from None
        raise
    return meta


class WeightsAsInputs(nn.Module):
    """``forward(weights, *inputs) = model(*inputs)`` with ``model``'s tensors taken from
    ``weights`` (a tuple in ``names`` order): exported, the program holds no weights.

    ``model`` is kept out of the module tree, so ``torch.export`` lifts none of its tensors.
    """

    def __init__(self, model: ServingModel) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.names = list(model.state_dict())

    def forward(self, weights: tuple[torch.Tensor, ...], ids: torch.Tensor, seq: torch.Tensor,
                seq_len: torch.Tensor, other_seq: Optional[torch.Tensor] = None,
                other_len: Optional[torch.Tensor] = None) -> torch.Tensor:
        inputs = (ids, seq, seq_len) if other_seq is None else (ids, seq, seq_len, other_seq, other_len)
        return torch.func.functional_call(self.model, dict(zip(self.names, weights)), inputs)


class BagWeightsAsInputs(WeightsAsInputs):
    """:class:`WeightsAsInputs` of a model with multi-valued features: ``forward(weights, ids, seq,
    seq_len, *rest)``, ``rest`` the inputs after ``seq_len`` in :attr:`ServingModel.inputs` order
    (``[other_seq, other_len,] bags, bag_len[, dense]``)."""

    def forward(self, weights: tuple[torch.Tensor, ...], ids: torch.Tensor, seq: torch.Tensor,  # type: ignore[override]
                seq_len: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, weights)), (ids, seq, seq_len, *rest))


class DenseWeightsAsInputs(WeightsAsInputs):
    """:class:`WeightsAsInputs` of a model with dense features: ``forward(weights, ids, seq,
    seq_len, dense)``."""

    def forward(self, weights: tuple[torch.Tensor, ...], ids: torch.Tensor, seq: torch.Tensor,  # type: ignore[override]
                seq_len: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, weights)), (ids, seq, seq_len, dense))


def weight_tuple(model: ServingModel) -> tuple[torch.Tensor, ...]:
    """The program's first input: ``model``'s tensors in ``state_dict`` order (serving.json ``weights``)."""
    return tuple(v.detach() for v in model.state_dict().values())


def export_program(model: ServingModel, max_seq_len: int) -> torch.export.ExportedProgram:
    """``model`` as a ``torch.export`` program ``(weights, ids, seq, seq_len[, other_seq, other_len])``
    with a dynamic batch dimension and no weights inside."""
    b = 4
    ex = (torch.zeros(b, len(model.single_features), dtype=torch.long),
          torch.zeros(b, max_seq_len, dtype=torch.long), torch.ones(b, dtype=torch.long))
    if "other_seq" in model.inputs:  # distinct tensors: export would tie inputs passed as one object
        ex = ex + tuple(t.clone() for t in ex[1:])
    if model.bags:
        ex = ex + (torch.zeros(b, len(model.bags), max_seq_len, dtype=torch.long),
                   torch.ones(b, len(model.bags), dtype=torch.long))
    if "dense" in model.inputs:
        ex = ex + (torch.zeros(b, len(model.schema.dense)),)
    batch = torch.export.Dim("batch", min=1)
    weights = weight_tuple(model)
    names = model.inputs  # ids, seq, seq_len[, other_seq, other_len][, bags, bag_len][, dense]
    if model.bags:  # the inputs after seq_len are one varargs tuple
        return torch.export.export(BagWeightsAsInputs(model), (weights, *ex),
                                   dynamic_shapes={"weights": tuple(None for _ in weights),
                                                   **{n: {0: batch} for n in names[:3]},
                                                   "rest": tuple({0: batch} for _ in names[3:])})
    wrap = DenseWeightsAsInputs(model) if "dense" in names else WeightsAsInputs(model)
    return torch.export.export(wrap, (weights, *ex),
                               dynamic_shapes={"weights": tuple(None for _ in weights),
                                               **{n: {0: batch} for n in names}})


def compile_aoti(ep: torch.export.ExportedProgram, path: str) -> str:
    """AOTInductor package of ``ep`` at ``path`` (a ``.pt2`` file): compiled C++/.so, no weights."""
    return torch._inductor.aoti_compile_and_package(ep, package_path=path)


def copy_feature_map(data_root: str, out: str) -> Optional[str]:
    """Copies a ``cctl-rec prepare`` dataset's mapping (features.json and the vocabularies it names,
    their sha256 checked on load) into ``out/features/``; returns its relative path, or None
    when ``data_root`` has no mapping (its ids are rows already)."""
    from cctl_rec.data.features.transform import FEATURES_JSON, FeatureMap
    from cctl_rec.data.manifest import join
    from iopath.common.file_io import g_pathmgr

    src = join(data_root, FEATURES_JSON)
    if not g_pathmgr.exists(src):
        return None
    FeatureMap.load(data_root)  # a broken or tampered mapping is refused before anything is copied
    with g_pathmgr.open(src, "rb") as f:
        raw = f.read()
    spaces = decode_json(raw, src).get("spaces", {})
    for rel in [FEATURES_JSON] + [e["vocab"]["path"] for e in spaces.values() if e.get("kind") == "vocab"]:
        dst = os.path.join(out, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with g_pathmgr.open(join(data_root, rel), "rb") as f:
            atomic_write_bytes(dst, f.read())
    return FEATURES_JSON


def _save_remote(model: ServingModel, out: str, info: dict[str, Any], max_seq_len: int,
                 data_root: Optional[str], aoti: bool) -> dict[str, Any]:
    """An export to a URL: written into a local temp directory, then uploaded with serving.json
    last (an earlier export's serving.json is removed first, so a reader never takes a partial
    upload for a complete export). A prefix holding anything but an earlier export is refused."""
    import tempfile

    from iopath.common.file_io import g_pathmgr

    from cctl_rec.data.manifest import join

    out = out.rstrip("/")
    if g_pathmgr.isdir(out) and g_pathmgr.ls(out) and not g_pathmgr.exists(join(out, "serving.json")):
        raise FileExistsError(f"--out {out} holds objects but no serving.json; expected a new prefix or an "
                              f"earlier export to replace")
    with tempfile.TemporaryDirectory(prefix="cctl-export-") as tmp:
        meta = _write_artifact(model, tmp, info, max_seq_len, data_root, aoti)
        if g_pathmgr.exists(join(out, "serving.json")):
            g_pathmgr.rm(join(out, "serving.json"))
        files = [os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs]
        for rel in sorted(files, key=lambda r: r == "serving.json"):
            g_pathmgr.copy_from_local(os.path.join(tmp, rel), join(out, *rel.split(os.sep)), overwrite=True)
    return meta


def local_export(path: str) -> str:
    """An export directory as a local path: a URL's files are downloaded once into the cache
    (``CCTL_REC_CACHE``), keyed by the URL and its serving.json."""
    if "://" not in path:
        return path
    import hashlib
    import tempfile

    from cctl_rec.storage import filesystem, scheme_of

    fs, path = filesystem(scheme_of(path)), path.rstrip("/")
    sj = path + "/serving.json"
    if not fs.exists(sj):
        raise FileNotFoundError(f"model {path} lacks ['serving.json']; is it a `cctl-rec export` output?")
    info = fs.info(sj)
    tag = f"{path}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}|{info.get('size')}"
    root = os.environ.get("CCTL_REC_CACHE") or os.path.join(tempfile.gettempdir(), "cctl-rec-cache")
    local = os.path.join(root, "export-" + hashlib.sha256(tag.encode()).hexdigest()[:32])
    if not os.path.exists(os.path.join(local, "serving.json")):
        tmp = f"{local}.tmp-{os.getpid()}"
        fs.get(path + "/", tmp + "/", recursive=True)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    return local


def _write_artifact(model: ServingModel, out: str, info: dict[str, Any], max_seq_len: int,
                    data_root: Optional[str] = None, aoti: bool = False) -> dict[str, Any]:
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(os.path.join(out, "model.pt"), buf.getvalue())
    program = aoti_file = None
    try:
        ep = export_program(model, max_seq_len)
        buf = io.BytesIO()
        kept, ep.example_inputs = ep.example_inputs, None  # saved, they would be a second copy of the weights
        torch.export.save(ep, buf)
        ep.example_inputs = kept
        atomic_write_bytes(os.path.join(out, "program.pt2"), buf.getvalue())
        program = "program.pt2"
    except Exception as e:  # the state dict stays the artifact; say why the program is missing
        logger.warning("torch.export failed, serving program not written: %s", str(e).splitlines()[0])
        if aoti:
            raise ValueError(f"--aoti needs the torch.export program, which failed: {first_line(e)}") from None
    if aoti:
        compile_aoti(ep, os.path.join(out, "model.aoti.pt2"))
        aoti_file = "model.aoti.pt2"
    features = copy_feature_map(data_root, out) if data_root else None
    dense = _dense_meta(model.schema, data_root) if model.schema.dense else None
    files = ("model.pt", "program.pt2", "model.aoti.pt2")
    meta = {"format": FORMAT, "schema": model.schema.to_json(), "embedding_dim": model.dim,
            "tower": list(model.hidden), "head": model.head, "max_seq_len": max_seq_len,
            "single_features": model.single_features, "inputs": model.inputs, "program": program,
            "program_inputs": ["weights"] + model.inputs, "weights": list(model.state_dict()),
            "aoti": aoti_file, "features": features, **({"dense": dense} if dense is not None else {}),
            "bytes": {f: os.path.getsize(os.path.join(out, f)) for f in files
                      if os.path.exists(os.path.join(out, f))}, **info}
    atomic_write_bytes(os.path.join(out, "serving.json"), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _dense_meta(schema: DomainSchema, data_root: Optional[str]) -> list[dict[str, Any]]:
    """serving.json ``dense``: per dense input column (``dense``'s order) its raw column and the
    train mean / std that standardise it (``x' = (x - mean) / std``, a null is the mean), from the
    training data's feature map; a dataset without one gives the columns alone."""
    stats: dict[str, Any] = {}
    if data_root:
        from cctl_rec.data.features.transform import FEATURES_JSON, FeatureMap
        from cctl_rec.data.manifest import join
        from iopath.common.file_io import g_pathmgr

        if g_pathmgr.exists(join(data_root, FEATURES_JSON)):
            stats = FeatureMap.load(data_root).dense["tgt"]
    out = []
    for f in schema.dense:
        st = stats.get(f.name)
        out.append({"name": f.name, "token": f.token} if st is None else
                   {"name": f.name, "token": f.token, "column": st.column, "normalize": st.normalize,
                    "mean": st.mean, "std": st.std})
    return out


def load_artifact(path: str) -> tuple[ServingModel, dict[str, Any]]:
    """Loads an export directory (state dict with ``weights_only=True``; no pickled objects)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"model directory {path} lacks {missing}; is it a `cctl-rec export` output?")
    sj = os.path.join(path, "serving.json")
    meta = decode_json(read_bounded(sj, MAX_SERVING_JSON_BYTES, "serving file"), sj)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{sj} has format {short(got)}, expected {FORMAT!r}")
    validate(ServingJSON, meta, sj, "`cctl-rec export` serving.json")
    check_schema_tables(meta["schema"], f"{sj}: schema")
    try:
        schema = DomainSchema.from_json(meta["schema"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{sj}: schema: {e}") from None
    pt = os.path.join(path, "model.pt")
    regular_file(pt, "model file")
    try:  # weights_only: tensors and plain containers; a pickled object is refused, never run
        state = torch.load(pt, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{pt} is not a weights-only state dict ({first_line(e)}); expected the model.pt "
                         f"of `cctl-rec export` (refusing to unpickle anything else)") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{pt} is not a state dict of tensors; expected the model.pt of `cctl-rec export`")
    dim, tower = meta["embedding_dim"], list(meta["tower"])
    table_dims = schema.table_dims(dim)
    for name, rows, _ in schema.tables():  # before the model is built: its size comes from serving.json
        got = state.get(f"tables.{name[2:]}")
        if got is None or tuple(got.shape) != (rows, table_dims[name]):
            raise ValueError(f"{pt} does not match {sj} (table {name[2:]} is "
                             f"{'absent' if got is None else ' x '.join(map(str, got.shape))} in model.pt, "
                             f"{rows} x {table_dims[name]} in serving.json)")
    if meta.get("head", "mlp") == "mlp":
        widths = [sum(schema.token_width(t, dim) for t in TOKENS)] + tower + [1]
        need = sum(a * b for a, b in zip(widths, widths[1:]))
        if need > sum(v.numel() for v in state.values()):
            raise ValueError(f"{pt} does not match {sj} (model.tower {short(tower)} needs {need:,} weights, "
                             f"model.pt holds fewer)")
    model = ServingModel(schema, int(dim), tuple(tower), str(meta.get("head", "mlp")))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{pt} does not match {path}/serving.json ({first_line(e)})") from None
    return model.eval(), meta


def padded_inputs(table, schema: DomainSchema, single: list[str], max_seq_len: int, path: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pyarrow table of target rows -> (ids B X F, seq B X L, seq_len B), range-checked."""
    from cctl_rec.data.reader import DomainRows, column_ids, lookup_rows

    rows = DomainRows(table, path)
    n = len(rows)
    card = lookup_rows(schema)  # the rows of the table each feature is looked up in
    ids = np.stack([column_ids(rows, name, card[name], max_seq_len)[0]
                    for name in single], axis=1) if single else np.zeros((n, 0), np.int64)
    seq, lens = _padded(*column_ids(rows, "seq", card["seq"], max_seq_len), max_seq_len)
    return torch.from_numpy(ids), seq, lens


def _padded(v: np.ndarray, lens: np.ndarray, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, lengths) of a list column -> (B X L left-aligned, zero-padded ids; B lengths)."""
    out = np.zeros((lens.size, max_seq_len), np.int64)
    pos = np.arange(v.size) - np.repeat(np.cumsum(lens) - lens, lens)
    out[np.repeat(np.arange(lens.size), lens), pos] = v
    return torch.from_numpy(out), torch.from_numpy(lens)


def serving_inputs(model: ServingModel, table, max_seq_len: int, path: str) -> tuple[torch.Tensor, ...]:
    """A pyarrow table of target rows -> every input of ``model.forward`` (:attr:`ServingModel.inputs`),
    range-checked; MiNet's ``other_seq`` against the target item table it is looked up in."""
    from cctl_rec.data.reader import DomainRows, column_ids

    from cctl_rec.data.reader import dense_values

    schema = model.schema
    out = padded_inputs(table, schema, model.single_features, max_seq_len, path)
    bags = bag_inputs(table, schema, model.bags, max_seq_len, path)
    if schema.dense:  # a dense model has no other_seq (CCTL refuses dense features with MiNet)
        missing = [c for c in schema.dense_columns if c not in table.column_names]
        if missing:
            raise ValueError(f"data file {path} lacks the dense column(s) {missing} the model reads (float32, "
                             f"standardised as `cctl-rec prepare` writes them)")
        return out + bags + (dense_values(DomainRows(table, path), schema),)
    if "other_seq" not in model.sequences:
        return out + bags
    if "other_seq" not in table.column_names:
        raise ValueError(f"data file {path} lacks the other_seq column that model.head={model.head} reads (the "
                         f"user's recent source-domain items, list<int>, empty lists allowed)")
    other = column_ids(DomainRows(table, path), "other_seq", schema.seq_table_rows(), max_seq_len)
    return out + _padded(*other, max_seq_len) + bags


def bag_inputs(table, schema: DomainSchema, names: list[str], max_seq_len: int, path: str
               ) -> tuple[torch.Tensor, ...]:
    """``(bags B X M X L, bag_len B X M)`` of the multi-valued features ``names`` (each truncated to
    its last ``max_seq_len`` ids and range-checked as in training), or ``()`` when M = 0."""
    if not names:
        return ()
    from cctl_rec.data.reader import DomainRows, column_ids, lookup_rows

    rows, card = DomainRows(table, path), lookup_rows(schema)
    cols = [_padded(*column_ids(rows, n, card[n], max_seq_len, is_list=True), max_seq_len) for n in names]
    return torch.stack([c[0] for c in cols], dim=1), torch.stack([c[1] for c in cols], dim=1)
