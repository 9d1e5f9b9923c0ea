"""The training batch: target rows, source rows and REN lookups, as KeyedJaggedTensors.

Follows TorchRec's ``Pipelineable`` contract (``to``, ``record_stream``, ``pin_memory``) so
``TrainPipelineSparseDist`` can drive it on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class CCTLBatch(Pipelineable):
    """One step's data.

    Attributes:
        tgt: target features, ``B_t`` rows, keys ``t_*`` (for DIN / MiNet heads followed by the
            per-position keys ``t_seq@j`` / ``t_other_seq@j``, ``schema.SeqPositions``).
        tgt_label: ``B_t`` float labels.
        user_in_other, item_in_other: ``B_t`` bools, the target row's user / item exists in the
            source domain (REN id mask).
        seq_mask: ``B_t`` bools, both of the user's sequences are non-empty (REN sequence mask).
        src: source features with their own tables, ``B_s + B_t`` rows, keys ``s_*``: first the
            ``B_s`` source samples, then, for REN, the target rows' user_id / item_id / other_seq
            looked up in the source tables (other keys empty). ``None`` for target-only models.
        mixed: the mixed network's target-table input, ``B_t + B_s`` rows, keys ``t_*``: the target
            rows, then the source rows' shared attributes (other keys empty). ``None`` when no
            source attribute is shared: the mixed network then reads ``tgt``.
        src_label: ``B_s`` float labels.
        src_harmful: ``B_s`` bools (ground truth, analysis only; all False when unknown).
        tgt_group: ``B_t`` int64 user groups of the target rows (0 warm, 1 cold; the split's
            ``user_group`` column, evaluation only), or None when the split has none.
        tgt_dense, src_dense: B_t X F_dense_t / B_s X F_dense_s float32 dense features of the
            target / source rows (``DomainSchema.dense`` order), None when the schema has none.
    """

    tgt: KeyedJaggedTensor
    tgt_label: torch.Tensor
    user_in_other: torch.Tensor
    item_in_other: torch.Tensor
    seq_mask: torch.Tensor
    src: Optional[KeyedJaggedTensor] = None
    mixed: Optional[KeyedJaggedTensor] = None
    src_label: Optional[torch.Tensor] = None
    src_harmful: Optional[torch.Tensor] = None
    tgt_group: Optional[torch.Tensor] = None
    tgt_dense: Optional[torch.Tensor] = None
    src_dense: Optional[torch.Tensor] = None

    @property
    def num_src(self) -> int:
        return 0 if self.src_label is None else int(self.src_label.numel())

    def _map(self, fn) -> "CCTLBatch":
        return CCTLBatch(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                            for f in fields(self)})

    def to(self, device: torch.device, non_blocking: bool = False) -> "CCTLBatch":
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                v.record_stream(stream)

    def pin_memory(self) -> "CCTLBatch":
        return self._map(lambda x: x.pin_memory())
