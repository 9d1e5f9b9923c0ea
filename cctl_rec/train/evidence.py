"""The evidence selector (``selector.mode=evidence``, not in the paper): a source row's weight goes
below 1 only where the evidence says rows like it hurt the target more than target rows alike.

"Rows like it" are the rows of the same label whose margin falls in the same bin, margin
m_i = (2 y_i - 1) * f(x_i) with f the mixed tower's logit: a negative margin is a row whose label
the model, trained on both domains, disagrees with — where mislabelled, off-domain or otherwise
harmful rows gather, but also the target's own hard rows. The evidence is each row's first-order
influence on a held-out target batch (:func:`cctl_rec.train.ifn.per_sample_influence`), centred
within its label class and domain and divided by the source's running mean magnitude. Per group g
(label x margin bin) decayed sums of every rank's rows give the source rows' mean s_g and the
step's *target* rows' mean t_g (the reference: rows that belong to the target; a group without
target rows takes the lowest target mean of its label), with standard errors, and

    d_g = s_g - t_g
    w_g = exp(strength * d_g)   if s_g < 0 and d_g < -t * sqrt(se(s_g)^2 + se(t_g)^2)
    w_g = 1                     otherwise

So every row starts at weight 1 (plain mixing), and a source group is lowered only once its rows
are shown to move the target's ranking loss the wrong way, by more than the target's own rows of
the same label and margin do. (Compared with zero instead, ``selector.evidence_reference=zero``,
the centred source always has a below-average half, which it then lowers even on clean data.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from cctl_rec.distributed.env import gather_cat


def _allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (``t`` on one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class _Moments:
    """Decayed count, sum and sum of squares per group."""

    def __init__(self, n: int) -> None:
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sq = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)

    def add(self, g: torch.Tensor, z: torch.Tensor, decay: float) -> None:
        self.sum.mul_(decay).index_add_(0, g, z)
        self.sq.mul_(decay).index_add_(0, g, z * z)
        self.count.mul_(decay).index_add_(0, g, torch.ones_like(z))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, standard error) per group; a group with fewer than 2 rows: mean 0, se inf."""
        n = self.count
        ok = n >= 2
        safe = n.clamp_min(1e-12)
        mean = torch.where(ok, self.sum / safe, torch.zeros_like(n))
        var = torch.where(ok, (self.sq / safe - mean * mean).clamp_min(0.0), torch.zeros_like(n))
        se = torch.where(ok, (var / safe).sqrt(), torch.full_like(n, float("inf")))
        return mean, se


class EvidenceTable:
    """Per-(label, margin bin) running influence statistics of the source rows (and of the target
    rows, the reference) and the weights they give.

    Args:
        edges: increasing margin bin edges (len(edges) + 1 bins per label).
        decay: per-step decay of the statistics, in [0, 1).
        t: standard errors below the reference a group's mean must be to count as harmful.
        strength: w = exp(strength * d) for a harmful group.
        reference: compare with the target rows' group means (else with zero).

    Example::

        ev = EvidenceTable((-2.0, 0.0, 2.0), decay=0.98, t=2.0, strength=2.0)
        g = ev.groups(labels, margins)      # B_s group ids
        w = ev.weights(g)                   # B_s weights in (0, 1]
        ev.update(g, z)                     # this step's source rows (every rank's)
        ev.update(g_t, z_t, reference=True) # this step's target rows
    """

    def __init__(self, edges: Sequence[float], decay: float, t: float, strength: float,
                 reference: bool = True) -> None:
        self.edges = torch.tensor(list(edges), dtype=torch.float32)
        self.decay, self.t, self.strength, self.use_reference = decay, t, strength, reference
        self.bins = len(edges) + 1
        self.src = _Moments(2 * self.bins)
        self.ref = _Moments(2 * self.bins)

    def groups(self, labels: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        """B labels (0/1), B margins -> B group ids in [0, 2 * (len(edges) + 1))."""
        bins = torch.bucketize(margins.detach().float(), self.edges)
        return (labels > 0.5).long() * self.bins + bins

    def update(self, g: torch.Tensor, z: torch.Tensor, reference: bool = False) -> None:
        """Decays the source (or reference) table one step and adds this step's rows of every rank."""
        all_g, all_z = gather_cat(g.long()), gather_cat(z.detach().double())
        (self.ref if reference else self.src).add(all_g, all_z, self.decay)

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: the target rows' mean and se; a group they do not reach takes its label's
        lowest target mean (with its se); no target rows of a label at all: 0 and se 0."""
        mean, se = self.ref.stats()
        if not self.use_reference:
            return torch.zeros_like(mean), torch.zeros_like(se)
        for lab in range(2):
            sl = slice(lab * self.bins, (lab + 1) * self.bins)
            m, s = mean[sl], se[sl]
            seen = torch.isfinite(s)
            if seen.any():
                k = torch.argmin(torch.where(seen, m, torch.full_like(m, float("inf"))))
                m[~seen], s[~seen] = m[k], s[k]
            else:
                m[:], s[:] = 0.0, 0.0
        return mean, se

    def group_weights(self) -> torch.Tensor:
        mean, se = self.src.stats()
        rmean, rse = self._reference()
        d = mean - rmean
        harmful = (mean < 0) & (d < -self.t * (se * se + rse * rse).sqrt())
        return torch.where(harmful, torch.exp(self.strength * d), torch.ones_like(d))

    def weights(self, g: torch.Tensor) -> torch.Tensor:
        """B_s group ids -> B_s weights in (0, 1] (fp32)."""
        return self.group_weights()[g].float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{w}_{k}": getattr(getattr(self, w), k) for w in ("src", "ref") for k in ("sum", "sq", "count")}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        for key, v in s.items():
            w, k = key.split("_", 1)
            getattr(getattr(self, w), k).copy_(v)

    def table(self) -> list[dict]:
        """Per group: label, margin range, source and target rows, means, weight (for metrics.json)."""
        mean, se = self.src.stats()
        rmean, _ = self._reference()
        w = self.group_weights()
        edges = [float("-inf"), *self.edges.tolist(), float("inf")]
        return [{"label": g // self.bins, "margin_lo": edges[g % self.bins], "margin_hi": edges[g % self.bins + 1],
                 "count": float(self.src.count[g]), "mean": float(mean[g]),
                 "se": float(se[g]) if torch.isfinite(se[g]) else None,
                 "target_count": float(self.ref.count[g]), "target_mean": float(rmean[g]), "weight": float(w[g])}
                for g in range(2 * self.bins)]


class LabelShift:
    """Label-shift weights: a source row of label y gets w_y = r_y / max(r_0, r_1), r_y = P_t(y) / P_s(y),
    with P_t, P_s the label shares of every target and source row seen so far (every rank's).

    Where the source's click rate matches the target's, every weight is 1 (plain mixing). Where the
    source over-represents a label — a source with another exposure policy, or mislabelled rows:
    flipping 30% of the labels of a 20%-CTR source makes 64% of its positives wrong (measured,
    docs/selector.md) — that label's rows are lowered until the mixed batch has the target's label
    balance; the other label keeps weight 1. Before both domains have rows of both labels, and while
    the two click shares do not differ significantly (|z| < ``min_z``, a two-proportion z test on the
    rows seen so far), every weight is 1: a shift that sampling alone explains is no evidence of harm.

    Example::

        ls = LabelShift()
        ls.update(src_labels, tgt_labels)   # each step
        w = ls.weights(src_labels)          # B_s weights in (0, 1]
    """

    HIST = (-10.0, 10.0, 400)
    """Margin histogram per source label (range and bins) for ``target="margin"``."""

    def __init__(self, target: str = "label", power: float = 1.0, min_z: float = 0.0) -> None:
        if target not in ("label", "margin"):
            raise ValueError(f"label shift target must be label or margin, got {target!r}")
        if min_z < 0:
            raise ValueError(f"label shift min_z must be >= 0, got {min_z}")
        self.target, self.power, self.min_z = target, power, min_z
        self.counts = torch.zeros(2, 2, dtype=torch.float64)   # [domain src/tgt, label 0/1]
        self.hist = torch.zeros(2, self.HIST[2], dtype=torch.float64)  # source margins per label

    def update(self, src_labels: torch.Tensor, tgt_labels: torch.Tensor,
               src_margins: Optional[torch.Tensor] = None) -> None:
        local = torch.tensor([[float((src_labels <= 0.5).sum()), float((src_labels > 0.5).sum())],
                              [float((tgt_labels <= 0.5).sum()), float((tgt_labels > 0.5).sum())]],
                             dtype=torch.float64)
        self.counts += _allreduce_sum(local)
        if self.target == "margin":
            assert src_margins is not None
            lo, hi, n = self.HIST
            h = torch.stack([torch.histc(src_margins[src_labels.flatten() > 0.5 if y else src_labels.flatten() <= 0.5]
                                         .detach().double().clamp(lo, hi), n, lo, hi) for y in (0, 1)])
            self.hist += _allreduce_sum(h)

    def z(self) -> float:
        """Two-proportion z statistic of the source's click share against the target's, from the
        rows seen so far (0 before both domains have rows): (P_s(1) - P_t(1)) / sqrt(P(1-P)(1/n_s + 1/n_t)),
        P the pooled share. Rows seen again in a later epoch count again, so over E epochs |z| is
        about sqrt(E) times that of the split itself."""
        c = self.counts
        n_s, n_t = float(c[0].sum()), float(c[1].sum())
        if n_s == 0 or n_t == 0:
            return 0.0
        pooled = float(c[:, 1].sum()) / (n_s + n_t)
        var = pooled * (1.0 - pooled) * (1.0 / n_s + 1.0 / n_t)
        diff = float(c[0, 1]) / n_s - float(c[1, 1]) / n_t
        return diff / var ** 0.5 if var > 0 else 0.0

    def label_weights(self) -> torch.Tensor:
        """(w_0, w_1); both 1 until the shift is significant (|z| >= ``min_z``)."""
        c = self.counts
        if bool((c == 0).any()) or abs(self.z()) < self.min_z:
            return torch.ones(2, dtype=torch.float64)
        ratio = (c[1] / c[1].sum()) / (c[0] / c[0].sum())
        return (ratio / ratio.max()) ** self.power

    def weights(self, labels: torch.Tensor, margins: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B_s weights: w_y per row (``target="label"``), or (``"margin"``) 0 for the rows of an
        over-represented label y whose margin is below its (1 - w_y) quantile (to the histogram's bin,
        rounding down), 1 for the rest: up to the same share of label y is dropped, taken from the rows
        the mixed network disagrees with most."""
        w = self.label_weights()
        lab = (labels > 0.5).long()
        if self.target == "label":
            return w[lab].float()
        assert margins is not None
        lo, hi, n = self.HIST
        out = torch.ones(labels.shape[0])
        for y in (0, 1):
            if w[y] >= 1.0 or self.hist[y].sum() == 0:
                continue
            cdf = torch.cumsum(self.hist[y], 0) / self.hist[y].sum()
            k = int(torch.searchsorted(cdf, torch.tensor([1.0 - float(w[y])], dtype=cdf.dtype)))
            cut = lo + (hi - lo) * k / n                 # left edge of the quantile's bin: at most that share
            out[(lab == y) & (margins.detach().float() < cut)] = 0.0
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "hist": self.hist}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.counts.copy_(s["counts"])
        self.hist.copy_(s["hist"])
