"""Logging set up once by the CLI: INFO on rank 0, WARNING elsewhere, ``[rank0] time level name: msg``.

fbgemm logs every TBE's construction at INFO on the root logger and TorchRec validates inputs at
INFO; those (and known deprecation chatter from the stack) are kept below WARNING unless
``--verbose``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

NOISY = ("root", "torchrec", "fbgemm_gpu", "torch")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _QuietStack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and str(record.msg).startswith("Sharding spec not found"):
            return False  # printing a plan whose data_parallel tables have no shard spec
        if record.levelno >= logging.WARNING and record.name != "torchrec.distributed.planner.types":
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in NOISY)


def setup_logging(verbose: bool = False) -> None:
    r = rank()
    level = logging.DEBUG if verbose else (logging.INFO if r == 0 else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{r}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(_QuietStack())
        for cat in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=cat)
        warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
        warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad.*")
        warnings.filterwarnings("ignore", message=".*The given NumPy array is not writable.*")
        warnings.filterwarnings("ignore", message=".*static_graph.*")
        warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
        # data_parallel tables on CPU use fbgemm's dense lookup, whose autograd goes through the
        # fallback; tests/test_sharding.py checks its gradients against an unsharded table.
        warnings.filterwarnings("ignore", message=".*dense_embedding_codegen_lookup_function.*")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not verbose:
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
