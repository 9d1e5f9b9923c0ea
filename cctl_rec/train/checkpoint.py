"""Checkpoints with torch.distributed.checkpoint (DCP): every piece of CCTL's training state.

A checkpoint ``RUN/checkpoints/step-00001200/`` holds, as DCP tensors (sharded tables stay
sharded; any world size can load them):

- ``model/*``: every table and dense module of the DMP model (mixed, pure, source, SAN);
- ``fused/*``: the fused TBE optimizer state (rowwise Adagrad momentum) of every table;
- ``dense/*``, ``dp/*``: Adam moments of towers and SAN; the data_parallel tables' optimizer;
- ``ifn/*``: the selector, its REINFORCE eligibility trace and accumulator (or its Adam state);

and ``trainer.json`` (plain JSON, no pickle): step, syncs, reward sum, history, the shaper's
baseline, and each rank's RNG state. The data streams' read positions follow from the step.
A checkpoint is written under a temp name and renamed once every rank is done, so an
interrupted write leaves the previous checkpoint intact; the newest K are kept.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from cctl_rec.data.manifest import atomic_write_bytes

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
        return flat

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


def _rng_b64() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        m = STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(d, name, "trainer.json")):
            out.append((int(m.group(1)), os.path.join(d, name)))
    return sorted(out)


def save_checkpoint(run_dir: str, step: int, state: TrainState, meta: dict[str, Any], keep: int) -> str:
    """Writes ``RUN/checkpoints/step-<step>`` (visible only when complete); keeps the newest ``keep``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".step-{step:08d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(state.tensors(), checkpoint_id=tmp)
    rngs = [None] * world
    dist.all_gather_object(rngs, _rng_b64())
    if rank == 0:
        atomic_write_bytes(os.path.join(tmp, "trainer.json"),
                           json.dumps({**meta, "step": step, "world_size": world, "rng": rngs}).encode())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
    dist.barrier()
    return final


def load_checkpoint(path: str, state: TrainState, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Loads a checkpoint into the live objects; returns its trainer.json (RNG restored when the
    world size matches). Raises ValueError if it belongs to another model or config."""
    meta_path = os.path.join(path, "trainer.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.json)")
    with open(meta_path) as f:
        meta = json.load(f)
    theirs = meta.get("fingerprint", {})
    diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {path} was made by a different model or config: {k} is "
                         f"{theirs.get(k)!r} there, {fingerprint.get(k)!r} here")
    state.prepare()
    flat = state.tensors()
    try:
        dcp.load(flat, checkpoint_id=path)
    except Exception as e:  # DCP raises a CheckpointException wrapping each rank's error
        raise ValueError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:200]})") from None
    state.restore(flat)
    rank = dist.get_rank()
    if meta.get("world_size") == dist.get_world_size() and meta.get("rng"):
        raw = base64.b64decode(meta["rng"][rank])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return meta
