"""Checkpoints with torch.distributed.checkpoint (DCP): every piece of CCTL's training state.

A checkpoint ``RUN/checkpoints/step-00001200/`` holds, as DCP tensors (sharded tables stay
sharded; any world size can load them):

- ``model/*``: every table and dense module of the DMP model (mixed, pure, source, SAN);
- ``fused/*``: the fused TBE optimizer state (rowwise Adagrad momentum) of every table;
- ``dense/*``, ``dp/*``: Adam moments of towers and SAN; the data_parallel tables' optimizer;
- ``ifn/*``: the selector, its REINFORCE eligibility trace and accumulator (or its Adam state and
  the influence mode's group table);

and ``trainer.json`` (plain JSON, no pickle): step, syncs, reward sum, history, the shaper's
baseline, and each rank's RNG state. The data streams' read positions follow from the step.
A checkpoint is written under a temp name and renamed once every rank is done, so an
interrupted write leaves the previous checkpoint intact; the newest K are kept. A failed write
(full disk) removes its temp directory and raises ``OSError`` naming the checkpoint; temp
directories of killed writes are removed by the next save.

In a run directory on a URL (``s3://bucket/run``; an object store has no rename) the ranks write
through DCP's ``FsspecWriter`` straight into ``step-<step>/``, and rank 0 writes ``trainer.json``
last, once DCP's ``.metadata`` is there: ``trainer.json`` is the marker that makes a checkpoint
count (:func:`list_checkpoints` lists only prefixes holding one; on S3, GCS and Azure an object
is visible only once completely written). A prefix without it (a killed write) is removed by the
next save; pruning removes the marker first.

DCP keeps its index (``.metadata``) as a pickle; before a load it is unpickled with an allow-list
of DCP's metadata classes (no byte-serialised objects, which DCP would ``torch.load`` without
``weights_only``), so a crafted checkpoint cannot run code. Tensors load with ``weights_only``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from pydantic import BaseModel, ConfigDict, Field

from iopath.common.file_io import g_pathmgr

from cctl_rec import storage
from cctl_rec.config import TrainConfig, to_dict
from cctl_rec.data.manifest import atomic_write_bytes, join
from cctl_rec.safe_io import decode_json, disk_error, first_line, read_bounded, short, validate

if TYPE_CHECKING:
    from cctl_rec.data.loader import Dataset

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _opt_tensors(opt: Optional[torch.optim.Optimizer], prefix: str) -> dict[str, torch.Tensor]:
    if opt is None:
        return {}
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{prefix}/{i}/{k}"] = v
    return out


def _load_opt(opt: Optional[torch.optim.Optimizer], prefix: str, flat: dict[str, torch.Tensor]) -> None:
    if opt is None:
        return
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, v in flat.items():
        if key.startswith(prefix + "/"):
            i, k = key[len(prefix) + 1:].split("/", 1)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def init_optimizer_state(opt: Optional[torch.optim.Optimizer]) -> None:
    """Creates an optimizer's lazy state with a zero-gradient step (parameters unchanged for
    Adam / Adagrad / SGD without weight decay) so that a checkpoint has a place to load into."""
    if opt is None:
        return
    params = [p for g in opt.param_groups for p in g["params"] if p not in opt.state]
    if not params:
        return
    saved = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    with torch.no_grad():
        for p, b, g in zip(params, before, saved):
            p.copy_(b)
            p.grad = g


@dataclass
class TrainState:
    """Everything a checkpoint holds, by reference to the live objects."""

    dmp: Any
    dense_opt: torch.optim.Optimizer
    dp_tables: Any
    ifn: Any

    def tensors(self) -> dict[str, Any]:
        flat: dict[str, Any] = {f"model/{k}": v for k, v in self.dmp.state_dict().items()}
        for pkey, st in self.dmp.fused_optimizer.state_dict().get("state", {}).items():
            for k, v in st.items():
                flat[f"fused/{pkey}/{k}"] = v
        flat.update(_opt_tensors(self.dense_opt, "dense"))
        if self.dp_tables.opt is not None:
            flat.update(_opt_tensors(self.dp_tables.opt, "dp"))
        if self.ifn is not None:
            for k, v in self.ifn.selector.state_dict().items():
                flat[f"ifn/selector/{k}"] = v
            if self.ifn.rl is not None:
                for i, (e, a) in enumerate(zip(self.ifn.rl.trace, self.ifn.rl.acc)):
                    flat[f"ifn/trace/{i}"], flat[f"ifn/acc/{i}"] = e, a
            flat.update(_opt_tensors(self.ifn.opt, "ifn/opt"))
            if self.ifn.groups is not None:
                flat["ifn/groups/sum"], flat["ifn/groups/count"] = self.ifn.groups.sum, self.ifn.groups.count
            if self.ifn.evidence is not None:
                flat.update({f"ifn/evidence/{k}": v for k, v in self.ifn.evidence.state_dict().items()})
            if self.ifn.label_shift is not None:
                flat.update({f"ifn/label_shift/{k}": v for k, v in self.ifn.label_shift.state_dict().items()})
        return flat

    def pure_keys(self, flat: dict[str, Any]) -> list[str]:
        """The keys of ``flat`` (:meth:`tensors`) that a mixed -> pure sync overwrites: the pure
        tables and tower, the pure tables' fused and data_parallel optimizer state, the pure
        tower's Adam moments."""
        module = self.dmp.module
        pure = {id(p) for p in module.pure_tower.parameters()} if hasattr(module, "pure_tower") else set()
        dense = [str(i) for i, p in enumerate(q for g in self.dense_opt.param_groups for q in g["params"])
                 if id(p) in pure]
        dp = [str(i) for i, name in enumerate(self.dp_tables.params) if name.startswith("pure_tgt.")] \
            if self.dp_tables.opt is not None else []
        prefixes = ("model/pure_tgt.", "model/pure_tower.", "fused/pure_tgt.",
                    *(f"dense/{i}/" for i in dense), *(f"dp/{i}/" for i in dp))
        return [k for k in flat if k.startswith(prefixes)]

    def prepare(self) -> None:
        """Materialises lazily created optimizer state before a load."""
        init_optimizer_state(self.dense_opt)
        init_optimizer_state(self.dp_tables.opt)
        if self.ifn is not None:
            init_optimizer_state(self.ifn.opt)

    def restore(self, flat: dict[str, Any]) -> None:
        self.dmp.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model/")})
        fused: dict[str, dict[str, Any]] = {}
        for k, v in flat.items():
            if k.startswith("fused/"):
                pkey, sk = k[6:].rsplit("/", 1)
                fused.setdefault(pkey, {})[sk] = v
        if fused:
            self.dmp.fused_optimizer.load_state_dict({"state": fused})
        _load_opt(self.dense_opt, "dense", flat)
        _load_opt(self.dp_tables.opt, "dp", flat)
        if self.ifn is not None:
            self.ifn.selector.load_state_dict({k[13:]: v for k, v in flat.items() if k.startswith("ifn/selector/")})
            if self.ifn.rl is not None:
                for i, (e, a) in enumerate(zip(self.ifn.rl.trace, self.ifn.rl.acc)):
                    e.copy_(flat[f"ifn/trace/{i}"])
                    a.copy_(flat[f"ifn/acc/{i}"])
            _load_opt(self.ifn.opt, "ifn/opt", flat)
            if self.ifn.groups is not None:
                self.ifn.groups.sum.copy_(flat["ifn/groups/sum"])
                self.ifn.groups.count.copy_(flat["ifn/groups/count"])
            if self.ifn.evidence is not None:
                self.ifn.evidence.load_state_dict({k: flat[f"ifn/evidence/{k}"]
                                                   for k in self.ifn.evidence.state_dict()})
            if self.ifn.label_shift is not None:
                self.ifn.label_shift.load_state_dict({k: flat[f"ifn/label_shift/{k}"] for k in ("counts", "hist")})


def _rng_b64() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of ``run_dir`` (those holding trainer.json), oldest first."""
    if storage.is_remote(run_dir):
        d = join(run_dir, "checkpoints")
        return sorted((int(m.group(1)), join(d, m.group(0))) for name in storage.find_names(d, "step-*/trainer.json")
                      if (m := STEP_DIR.match(name.split("/")[0])) and name.count("/") == 1)
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        m = STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(d, name, "trainer.json")):
            out.append((int(m.group(1)), os.path.join(d, name)))
    return sorted(out)


def dcp_cause(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (itself otherwise)."""
    if isinstance(e, CheckpointException) and e.failures:
        return dcp_cause(next(iter(e.failures.values()))[0])
    return e


_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
"""What torch's file writer says when a write fails (the OSError behind it is lost when DCP
gathers the ranks' errors: exceptions are pickled without their context)."""


def _write_failure(cause: BaseException, root: str) -> Optional[int]:
    """The errno of a failed checkpoint write that torch reported as a RuntimeError, or None when
    ``cause`` is not a write failure: from the message, else from the disk itself (read-only,
    nearly full), else EIO."""
    text = str(cause)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG):
        if os.strerror(code) in text:
            return code
    if not (isinstance(cause, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES)):
        return None
    if storage.is_remote(root):  # no disk to ask
        return errno.EIO
    try:
        st = os.statvfs(root)
    except OSError:
        return errno.EIO
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < 64 << 20:  # what is left cannot hold a checkpoint
        return errno.ENOSPC
    return errno.EIO


TEMP_DIR = re.compile(r"^\.step-\d{8}\.tmp(-\d+)?$")
"""A checkpoint being written: ``.step-<step>.tmp-<pid of rank 0>`` (unique per process)."""


PRESYNC = "presync"
"""A final checkpoint's subdirectory: what the run's last sync overwrote (the pure network as
training left it), so that a longer rerun resumes exactly the run it continues."""


def save_checkpoint(run_dir: str, step: int, state: TrainState, meta: Callable[[], dict[str, Any]], keep: int,
                    final_sync: Optional[Callable[[], None]] = None) -> str:
    """Writes ``RUN/checkpoints/step-<step>`` (visible only when complete); keeps the newest ``keep``.

    ``meta()`` (called on every rank) gives what trainer.json holds besides step, world size and
    RNG state. With
    ``final_sync`` (the run's last mixed -> pure sync), the tensors it overwrites are written into
    ``PRESYNC/`` first, then it runs, then the checkpoint: its pure network is the served one, and
    :func:`load_checkpoint` puts the pure network back as it was before that sync.

    Raises:
        OSError: the write failed (e.g. ENOSPC); the temp directory is gone, older checkpoints
            are untouched.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    remote = storage.is_remote(run_dir)
    root = join(run_dir, "checkpoints")
    final = join(root, f"step-{step:08d}")
    pid = [os.getpid()]
    if world > 1:  # every rank writes into rank 0's temp directory
        dist.broadcast_object_list(pid, src=0)
    tmp = final if remote else os.path.join(root, f".step-{step:08d}.tmp-{pid[0]}")
    if rank == 0 and remote:  # no rename: written in place, trainer.json (the marker) last
        complete = {p for _, p in list_checkpoints(run_dir)}
        for name in storage.list_names(root):  # killed writes, and an earlier checkpoint of this step
            if STEP_DIR.match(name) and (join(root, name) not in complete or name == f"step-{step:08d}"):
                storage.remove_tree(join(root, name), first="trainer.json")
    elif rank == 0:
        if os.path.isdir(root):  # temp directories of writes that were killed
            for name in os.listdir(root):
                if TEMP_DIR.match(name):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        presync: dict[str, Any] = {}
        if final_sync is not None:
            flat = state.tensors()
            pre = join(tmp, PRESYNC)
            dcp.save({k: flat[k] for k in state.pure_keys(flat)}, checkpoint_id=pre,
                     storage_writer=storage.dcp_writer(pre))
            final_sync()
            presync = {"presync": PRESYNC}
        dcp.save(state.tensors(), checkpoint_id=tmp, storage_writer=storage.dcp_writer(tmp))
        info = meta()
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_b64())
        if rank == 0:
            body = json.dumps({**info, **presync, "step": step, "world_size": world, "rng": rngs}).encode()
            if remote:
                storage.write_object(join(final, "trainer.json"), body)
            else:
                atomic_write_bytes(os.path.join(tmp, "trainer.json"), body)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
    except BaseException as e:
        if rank == 0:
            if remote:
                try:
                    storage.remove_tree(tmp, first="trainer.json")
                except Exception as cleanup:  # the next save removes it (no trainer.json: not listed)
                    logger.warning("could not remove the incomplete checkpoint %s: %s", tmp, first_line(cleanup))
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        cause = dcp_cause(e)
        disk = disk_error(e)
        code = disk.errno if disk is not None else cause.errno if isinstance(cause, OSError) else \
            _write_failure(cause, root)
        if code is None and remote and isinstance(cause, OSError):  # the store refused or failed a request
            code = errno.EACCES if isinstance(cause, PermissionError) else errno.EIO
        if code is not None:
            why = disk.strerror if disk is not None else first_line(cause) if remote else os.strerror(code)
            raise OSError(code or errno.EIO, f"{why} while writing checkpoint {final}; it was not written, the "
                          f"previous checkpoints are intact") from None  # the path once, in the message
        raise
    if rank == 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            if remote:
                storage.remove_tree(old, first="trainer.json")
            else:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
    dist.barrier()
    return final


class TrainerJSON(BaseModel):
    """A checkpoint's trainer.json: what a resume reads is typed."""

    model_config = ConfigDict(strict=True, extra="allow")
    fingerprint: dict[str, str]
    step: int = Field(ge=0, le=1 << 62)
    world_size: int = Field(ge=1, le=1 << 20)
    rng: Optional[list[str]] = None
    history: list[dict[str, Any]] = []
    syncs: int = Field(default=0, ge=0)
    reward_sum: float = 0.0
    log_window: Optional[list[Any]] = None
    metric_window: Optional[list[Optional[str]]] = None
    final: bool = False
    presync: Optional[str] = Field(default=None, pattern=f"^{PRESYNC}$")


MAX_TRAINER_JSON_BYTES = 256 << 20


def read_trainer_meta(path: str) -> dict[str, Any]:
    """A checkpoint's ``trainer.json`` (bounded read, validated). Raises FileNotFoundError /
    ValueError naming it and the key."""
    meta_path = join(path, "trainer.json")
    if not g_pathmgr.exists(meta_path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.json)")
    meta = decode_json(read_bounded(meta_path, MAX_TRAINER_JSON_BYTES, "checkpoint file"), meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds {type(meta).__name__}; expected a JSON object")
    validate(TrainerJSON, meta, meta_path, "cctl-rec checkpoint's trainer.json")
    return meta


def run_fingerprint(cfg: TrainConfig, data: "Dataset") -> dict[str, str]:
    """What a checkpoint must agree on to be loaded: model, training rule, seed, data layout and
    the dataset itself (its manifest's sha256: shards, rows, checksums, schema), so a run
    directory belongs to one run."""
    d = to_dict(cfg)
    return {"model": json.dumps(d["model"], sort_keys=True), "selector": json.dumps(d["selector"], sort_keys=True),
            "scn": json.dumps(d["scn"], sort_keys=True), "ren": json.dumps(d["ren"], sort_keys=True),
            "optim": json.dumps(d["optim"], sort_keys=True),
            "data": json.dumps({k: d["data"][k] for k in ("batch_size", "src_ratio", "max_seq_len", "epochs")}),
            "schema": json.dumps({k: s.to_json() for k, s in data.schemas.items()}, sort_keys=True),
            "seed": str(cfg.run.seed),
            "dataset": "manifest sha256 " + hashlib.sha256(json.dumps(data.manifest, sort_keys=True).encode()
                                                           ).hexdigest()}


def check_fingerprint(path: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Returns the checkpoint's trainer.json; raises ValueError with the first key that differs
    when it belongs to another model, config, seed or dataset."""
    meta = read_trainer_meta(path)
    theirs = meta["fingerprint"]
    diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {path} was made by a different model or config: {k} is "
                         f"{short(theirs.get(k), 160)} there, {short(fingerprint.get(k), 160)} here; a run directory "
                         f"holds one run (same config, run.seed and dataset): use a new --run-dir")
    return meta


# What DCP's .metadata pickle may hold: its metadata records, torch sizes / dtypes / layouts, paths.
# BytesStorageMetadata is left out on purpose: DCP torch.loads such entries without weights_only.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))):
            return super().find_class(module, name)
        raise ValueError(f"checkpoint {self.path}: its .metadata refers to {module}.{name}; expected only DCP "
                         f"tensor metadata (refusing to unpickle it)")


def check_metadata(path: str) -> None:
    """Unpickles ``path/.metadata`` with the allow-list (raises ValueError on anything else), so
    that DCP's own ``pickle.load`` of it afterwards cannot run code."""
    md = join(path, ".metadata")
    if not g_pathmgr.exists(md):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
    with g_pathmgr.open(md, "rb") as f:
        try:
            _MetadataUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
            raise ValueError(f"checkpoint {path}: .metadata is not readable ({e}); the checkpoint is "
                             f"corrupt") from None


def load_checkpoint(path: str, state: TrainState, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Loads a checkpoint into the live objects; returns its trainer.json (RNG restored when the
    world size matches). Raises ValueError if it belongs to another model or config.

    A final checkpoint written after the run's last sync (``presync``) loads as training left it:
    the pure network from ``PRESYNC/``, and ``syncs`` without that last sync."""
    meta = check_fingerprint(path, fingerprint)
    check_metadata(path)
    pre = join(path, PRESYNC)
    if meta.get("presync"):
        check_metadata(pre)
    state.prepare()
    flat = state.tensors()
    try:
        dcp.load(flat, checkpoint_id=path, storage_reader=storage.dcp_reader(path))
        if meta.get("presync"):
            dcp.load({k: flat[k] for k in state.pure_keys(flat)}, checkpoint_id=pre,
                     storage_reader=storage.dcp_reader(pre))
            meta["syncs"] = meta.get("syncs", 0) - 1
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error
        raise ValueError(f"checkpoint {path} does not fit this model ({first_line(dcp_cause(e))})") from None
    state.restore(flat)
    rank = dist.get_rank()
    if meta.get("world_size") == dist.get_world_size() and meta.get("rng"):
        raw = base64.b64decode(meta["rng"][rank])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return meta
