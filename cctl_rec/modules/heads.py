"""Prediction heads over per-field embeddings: the single-domain baselines of the paper's Table 2.

Every head maps B X (F * D) — F fields of width D, concatenated in token order (what the SCN
tower takes) — to B logits, so the same mixed/pure machinery trains and serves any of them.

- ``mlp``: the SCN tower (the paper's DNN).
- ``lr``: one weight per field element plus a bias. Since the embeddings are learned, w_f . e_id
  is a free scalar per id and field: logistic regression over the one-hot ids.
- ``deepfm``: LR + the FM second-order term sum_{f<g} <v_f, v_g> + the MLP (Guo et al., 2017).
- ``afm``: LR + attention-pooled pairwise products p^T sum_{f<g} a_fg (v_f * v_g) (Xiao et al., 2017).
- ``star``: STAR's star-topology tower (Sheng et al., 2021): each layer's weight is a shared matrix
  times (elementwise) a per-domain one, its bias their sum; source rows go through the source
  factors, target rows (and serving) through the target ones.
- ``conet``: CoNet's two columns with shared cross units per layer (Hu et al., 2018;
  :mod:`cctl_rec.modules.conet`); like STAR, source rows read the source column's logit.
- ``din``, ``minet``: DIN (Zhou et al., 2018) and MiNet (Ouyang et al., 2020) also read the user's
  behaviour sequences position by position (:data:`cctl_rec.schema.HEAD_SEQUENCES`; their
  ``forward(x, *per column: B X L X D embeddings, B X L bool mask)``, :mod:`cctl_rec.modules.interest`);
  target rows only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cctl_rec.modules.conet import CoNetTower
from cctl_rec.modules.interest import DINHead, MiNetHead
from cctl_rec.modules.tower import Tower, mlp
from cctl_rec.schema import HEAD_SEQUENCES

HEADS = ("mlp", "lr", "deepfm", "afm", "star", "din", "conet", "minet")
DOMAIN_HEADS = ("star", "conet")
"""Heads whose forward takes the row's domain (``tower(x, "src")`` for source rows)."""


def _fields(x: torch.Tensor, dim: int) -> torch.Tensor:
    """B X (F * D) -> B X F X D."""
    return x.view(x.shape[0], -1, dim)


class LRHead(nn.Module):
    """B X (F * D) -> B logits: a linear model."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """sum_{f<g} <v_f, v_g> for B X F X D: 0.5 * sum_d ((sum_f v)^2 - sum_f v^2) -> B."""
    return 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1)


class DeepFMHead(nn.Module):
    """LR + FM + MLP over the same field embeddings: B X (F * D) -> B logits."""

    def __init__(self, in_dim: int, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(in_dim, 1)
        self.deep = mlp(in_dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fm = fm_interaction(_fields(x, self.dim))
        return (self.linear(x) + self.deep(x)).squeeze(-1) + fm


class AFMHead(nn.Module):
    """LR + attentional FM: B X (F * D) -> B logits.

    Args:
        in_dim: F * D.
        dim: D.
        attn: width of the attention network (the paper's t).
    """

    def __init__(self, in_dim: int, dim: int, attn: int = 16) -> None:
        super().__init__()
        self.dim = dim
        n = in_dim // dim
        i, j = torch.triu_indices(n, n, offset=1)
        self.register_buffer("i", i, persistent=False)
        self.register_buffer("j", j, persistent=False)
        self.linear = nn.Linear(in_dim, 1)
        self.attn = nn.Sequential(nn.Linear(dim, attn), nn.ReLU(), nn.Linear(attn, 1, bias=False))
        self.p = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = _fields(x, self.dim)                       # B X F X D
        pairs = v[:, self.i] * v[:, self.j]            # B X P X D, P = F(F-1)/2
        a = torch.softmax(self.attn(pairs), dim=1)     # B X P X 1
        return self.linear(x).squeeze(-1) + self.p((a * pairs).sum(1)).squeeze(-1)


class StarTower(nn.Module):
    """STAR's star-topology FCN: B X in_dim -> B logits, per domain.

    Layer l computes h W_l^T + b_l with W_l = W_l^shared * W_l^domain (elementwise) and
    b_l = b_l^shared + b_l^domain; the domain factors start at ones / zeros, so both domains start
    from the shared network.

    Args:
        in_dim: input width; hidden: hidden widths; domains: the domain names.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], domains: tuple[str, ...] = ("tgt", "src")) -> None:
        super().__init__()
        dims = [in_dim, *hidden, 1]
        self.n = len(dims) - 1
        self.shared = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(self.n))
        self.w = nn.ParameterDict({f"{d}_{i}": nn.Parameter(torch.ones(dims[i + 1], dims[i]))
                                   for d in domains for i in range(self.n)})
        self.b = nn.ParameterDict({f"{d}_{i}": nn.Parameter(torch.zeros(dims[i + 1]))
                                   for d in domains for i in range(self.n)})

    def forward(self, x: torch.Tensor, domain: str = "tgt") -> torch.Tensor:
        h = x
        for i, lin in enumerate(self.shared):
            h = torch.nn.functional.linear(h, lin.weight * self.w[f"{domain}_{i}"], lin.bias + self.b[f"{domain}_{i}"])
            if i < self.n - 1:
                h = torch.relu(h)
        return h.squeeze(-1)


def build_head(head: str, in_dim: int, dim: int, hidden: tuple[int, ...], domains: tuple[str, ...] = ("tgt",),
               *, fields: Optional[dict[str, int]] = None) -> nn.Module:
    """The tower of the mixed and pure networks: ``head`` in :data:`HEADS`; ``domains``: the
    domains a STAR or CoNet tower serves (the pure network: target only; CoNet's target logit
    still reads the source column below its last layer); ``fields``: field name -> index
    in the tower input (DIN and MiNet find the candidate, user and sequence fields by it)."""
    if head == "mlp":
        return Tower(in_dim, hidden)
    if head == "lr":
        return LRHead(in_dim)
    if head == "deepfm":
        return DeepFMHead(in_dim, dim, hidden)
    if head == "afm":
        return AFMHead(in_dim, dim)
    if head == "star":
        return StarTower(in_dim, hidden, domains)
    if head == "conet":
        return CoNetTower(in_dim, hidden, domains)
    if head in HEAD_SEQUENCES:
        if fields is None:
            raise ValueError(f"model.head={head} needs the field layout of the tower input (fields=...)")
        return (DINHead if head == "din" else MiNetHead)(in_dim, dim, hidden, fields)
    raise ValueError(f"model.head={head!r}: expected one of {list(HEADS)}")


class GradReverse(torch.autograd.Function):
    """Identity forward, -lambda * grad backward (DANN's gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return -ctx.lam * g, None


class DomainClassifier(nn.Module):
    """DANN's domain discriminator behind a gradient reversal: B X W -> B logits (source = 1).

    Training it to tell the domains apart pushes the features it reads (the tower's input)
    toward domain invariance (Ganin et al., 2016).
    """

    def __init__(self, in_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = mlp(in_dim, (hidden,), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(GradReverse.apply(x, 1.0)).squeeze(-1)
