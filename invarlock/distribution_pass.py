"""Distribution evidence on the torch side: what one scoring pass keeps of a model's
next-token distribution at every scored token (capture: top-k log-probabilities, tail mass,
target), or how it compares with another model's compact form (KL both ways, top-token
agreement, Δp). The scorers in `invarlock.evaluate` hand it each vocabulary slice's logits
(or a chunk's whole logits) before they are exponentiated, so its memory is O(rows x k)
whatever the vocabulary. The arithmetic on the results is `invarlock.distribution`'s.
"""

from __future__ import annotations

import numpy as np
import torch

from invarlock.distribution import TAIL_FLOOR, CompactDistribution, TokenComparison
from invarlock.errors import EvidenceError, InputError

IGNORE = -100                   # label value for positions that are not scored
# Top-k selection: entries are thresholded before they are ranked (see `_top_k`)
SELECT_MIN_SPAN = 4             # columns per group (of 2k): narrower slices are ranked whole
SELECT_MAX_CANDIDATES = 4       # x k: more entries than this per row at a floor, re-threshold


class DistributionPass:
    """One batch's distribution evidence: capture this model's top-k, or compare it with a
    reference (the baseline's compact form at the batch's scored tokens, in order).

    Rows reach it in the order the scorers walk them (window-major, then position), in one
    or more groups (`rows`, `full_rows`); each group's scored rows take the next rows of the
    reference, so the scored tokens must be exactly those the reference was captured at."""

    def __init__(self, k: int | None, reference: dict[str, torch.Tensor] | None) -> None:
        self.k = k
        self.reference = reference
        self.used = 0
        self.out: list[dict[str, torch.Tensor]] = []

    @classmethod
    def for_windows(cls, spec: int | CompactDistribution, window_ids: np.ndarray,
                    device: str) -> DistributionPass:
        if not isinstance(spec, CompactDistribution):
            if int(spec) < 1:
                raise InputError(f"distribution evidence needs k >= 1, got {spec}")
            return cls(int(spec), None)
        try:
            rows = spec.rows_of(np.asarray(window_ids))
        except ValueError as exc:
            raise EvidenceError(f"the baseline's stored distribution does not cover the "
                                f"windows: {exc}") from None

        def move(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array[rows])).to(device, dtype)

        return cls(None, {"ids": move(spec.top_ids, torch.int64),
                          "top": move(spec.top_logp, torch.float32),
                          "tail": move(spec.tail_logp, torch.float64),
                          "target": move(spec.target_logp, torch.float64)})

    def rows(self, targets: torch.Tensor) -> RowStats:
        """Statistics for a group of rows with these targets (IGNORE: not scored)."""
        scored = targets != IGNORE
        if self.reference is None:
            return RowStats(self, scored, self.k, None)
        m = int(scored.sum())
        total = self.reference["ids"].shape[0]
        if self.used + m > total:
            raise EvidenceError("the baseline's stored distribution holds fewer scored tokens "
                                "than the windows; it belongs to other windows")
        ref = {}
        for name, part in self.reference.items():
            full = torch.zeros((targets.shape[0], *part.shape[1:]), dtype=part.dtype,
                               device=targets.device)
            full[scored] = part[self.used:self.used + m].to(targets.device)
            ref[name] = full
        self.used += m
        return RowStats(self, scored, None, ref)

    def full_rows(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """A group whose logits [n, V] (float32) are all at hand."""
        stats = self.rows(targets)
        top = logits.amax(dim=1, keepdim=True)
        stats.update(logits, 0, top[:, 0])
        safe = torch.where(targets == IGNORE, 0, targets).clamp(0, logits.shape[1] - 1)
        top = torch.where(torch.isfinite(top), top, 0.0)
        # summed in float64, as the sliced pass's running log-partition (see there)
        log_z = (logits - top).exp_().sum(dim=1, dtype=torch.float64).log_() + top[:, 0]
        stats.finish(log_z, logits.gather(1, safe[:, None])[:, 0])

    def collected(self) -> dict[str, torch.Tensor]:
        if self.reference is not None and self.used != self.reference["ids"].shape[0]:
            raise EvidenceError("the baseline's stored distribution holds more scored tokens "
                                "than the windows; it belongs to other windows")
        if not self.out:
            return {}
        return {name: torch.cat([part[name] for part in self.out]) for name in self.out[0]}


class RowStats:
    """Running per-row state over vocabulary slices (before each slice is exponentiated).

    Capture keeps a running top-k; once it is full, its smallest value is a floor that a
    later slice's entry must reach to enter, so most of a wide vocabulary's slices add few
    candidates. Comparison picks the subject's logits at the baseline's top ids: one gather
    when every id falls in the first slice, else the ids sorted once and each slice taking
    its own run of them, so the work is O(rows x k) over the whole vocabulary, not per slice.
    """

    def __init__(self, owner: DistributionPass, scored: torch.Tensor, k: int | None,
                 reference: dict[str, torch.Tensor] | None) -> None:
        self.owner, self.scored, self.k, self.reference = owner, scored, k, reference
        n = scored.shape[0]
        self.values: torch.Tensor | None = None   # capture: running top-k logits [n, k]
        self.ids: torch.Tensor | None = None
        if reference is not None:
            self.at_ref = torch.full(reference["ids"].shape, float("-inf"),
                                     device=scored.device)
            self.best = torch.full((n,), float("-inf"), device=scored.device)
            self.order: torch.Tensor | None = None   # flat positions of the ids, by id
            self.sorted_ids: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, lo: int, row_max: torch.Tensor) -> None:
        """One slice: logits [n, width] of vocabulary entries lo .. lo + width, and each
        row's largest logit in it (which the log-partition has computed already)."""
        if self.reference is None:
            self._capture(logits, lo)
            return
        width = logits.shape[1]
        wanted = self.reference["ids"]
        if self.order is None and lo == 0 and int(wanted.max()) < width:
            self.at_ref = logits.gather(1, wanted)
        else:
            if self.order is None:
                flat = wanted.reshape(-1)
                self.order = torch.argsort(flat)
                self.sorted_ids = flat[self.order]
            assert self.sorted_ids is not None
            bounds = torch.tensor([lo, lo + width], dtype=wanted.dtype, device=wanted.device)
            a, b = torch.searchsorted(self.sorted_ids, bounds).tolist()
            if b > a:
                at = self.order[a:b]
                self.at_ref.view(-1)[at] = logits[at // wanted.shape[1],
                                                  self.sorted_ids[a:b] - lo]
        self.best = torch.maximum(self.best, row_max)

    def _capture(self, logits: torch.Tensor, lo: int) -> None:
        assert self.k is not None
        full = self.values is not None and self.values.shape[1] >= self.k
        values, ids = _top_k(logits, self.k, self.values.amin(dim=1) if full else None)
        ids += lo
        if self.values is not None:
            values = torch.cat([self.values, values], dim=1)
            ids = torch.cat([self.ids, ids], dim=1)
            values, pick = values.topk(min(self.k, values.shape[1]), dim=1, sorted=False)
            values, ids = _largest_first(values, ids.gather(1, pick))
        self.values, self.ids = values, ids

    def finish(self, log_z: torch.Tensor, target_logit: torch.Tensor) -> None:
        """Turn the running state into per-token evidence for the scored rows.

        Log-probabilities are differences taken in float64 (a logit minus the float64
        log-partition) and kept in float32; sums over the k entries are float64."""
        s = self.scored
        log_z = log_z[s].double()
        target = target_logit[s].double() - log_z
        if self.reference is None:
            assert self.values is not None and self.ids is not None
            top = (self.values[s].double() - log_z[:, None]).float()
            self.owner.out.append({"top_ids": self.ids[s].int(), "top_logp": top,
                                   "tail_logp": _tail(top.exp().sum(dim=1, dtype=torch.float64))
                                   .float(), "target_logp": target.float()})
            return
        ref = self.reference
        p_top, p_tail = ref["top"][s], ref["tail"][s]
        q_top = (self.at_ref[s].double() - log_z[:, None]).float()
        p, q = p_top.exp(), q_top.exp()
        q_mass = q.sum(dim=1, dtype=torch.float64)
        q_tail = _tail(q_mass).float().double()  # rounded as the baseline's stored tail
        d = p_top - q_top
        fwd_top = (p * d).sum(dim=1, dtype=torch.float64)      # Σ_top p log(p/q)
        rev_top = -(q * d).sum(dim=1, dtype=torch.float64)     # Σ_top q log(q/p)
        # the top entries and the tail as one outcome, plus the tail's own divergence
        # estimated by that of the top entries renormalised (invarlock.distribution):
        # Σ (p/P)(log(p/P) − log(q/Q)) = Σ_top (p/P) log(p/q) − log(P/Q), P and Q the top
        # masses. Taken in log space: a subject that moves its mass off the baseline's top
        # entries (a spiked logit elsewhere) has Q below float range, not 0/0.
        p_top64, q_top64 = p_top.double(), q_top.double()
        log_ratio = p_top64.logsumexp(dim=1) - q_top64.logsumexp(dim=1)
        fwd_norm = (p_top64.softmax(dim=1) * d).sum(dim=1)      # Σ_top (p/P) log(p/q)
        rev_norm = -(q_top64.softmax(dim=1) * d).sum(dim=1)     # Σ_top (q/Q) log(q/p)
        p_rest, q_rest = p_tail.exp(), q_tail.exp()
        forward = (fwd_top + p_rest * (p_tail - q_tail)
                   + p_rest * (fwd_norm - log_ratio))
        reverse = (rev_top + q_rest * (q_tail - p_tail)
                   + q_rest * (rev_norm + log_ratio))
        self.owner.out.append({
            "kld": forward.clamp(min=0.0), "kld_reverse": reverse.clamp(min=0.0),
            # the subject's largest logit is its logit at the baseline's top token (a tie
            # counts as agreement); no argmax needed
            "same_top": self.at_ref[s][:, 0] >= self.best[s],
            "delta_p": target.exp() - ref["target"][s].exp()})


def _top_k(logits: torch.Tensor, k: int, floor: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row and their columns, the largest first and the rest
    in no particular order; with ``floor`` (per row) only entries >= floor need be exact
    (the rest may be -inf fillers).

    torch.topk on CPU costs several times an elementwise pass per entry, so most entries
    are ruled out first by a threshold that every top-k entry reaches: the floor, or the
    k-th largest of the maxima of 2k groups of columns (k groups have a maximum at least
    that large, so at least k entries do). The groups are strided (column j in group
    j mod 2k), so their maxima are elementwise maxima of contiguous runs. Only entries at
    or above the threshold (about 1.5k per row) are packed into a narrow array and ranked."""
    n, width = logits.shape
    k = min(k, width)
    mask = None
    if floor is not None:
        mask = logits >= floor[:, None]
        if int(mask.sum(dim=1).amax()) > SELECT_MAX_CANDIDATES * k:
            mask = None  # a slice far above the running top-k: threshold it by groups
    if mask is None:
        groups = 2 * k
        span = width // groups
        if span < SELECT_MIN_SPAN:
            top, pick = logits.topk(k, dim=1, sorted=False)
            return _largest_first(top, pick)
        maxima = logits[:, :span * groups].unflatten(1, (span, groups)).amax(dim=1)
        rest = width - span * groups  # fewer than `groups` columns: one more in each of the first
        if rest:
            maxima[:, :rest] = torch.maximum(maxima[:, :rest], logits[:, span * groups:])
        threshold = maxima.topk(k, dim=1, sorted=False).values.amin(dim=1)
        if floor is not None:
            threshold = torch.maximum(threshold, floor)
        mask = logits >= threshold[:, None]
    flat = mask.reshape(-1).nonzero().squeeze(1)
    rows = flat // width
    counts = torch.bincount(rows, minlength=n)
    wide = max(k, int(counts.max())) if flat.numel() else k
    slot = torch.arange(flat.numel(), device=logits.device) - (counts.cumsum(0) - counts)[rows]
    dest = rows * wide + slot
    values = logits.new_full((n * wide,), float("-inf")).index_copy_(
        0, dest, logits.reshape(-1).index_select(0, flat))
    ids = torch.zeros(n * wide, dtype=torch.int64, device=logits.device).index_copy_(
        0, dest, flat - rows * width)
    top, pick = values.view(n, wide).topk(k, dim=1, sorted=False)
    return _largest_first(top, ids.view(n, wide).gather(1, pick))


def _largest_first(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An unsorted top-k with each row's largest entry swapped into column 0 (the top token,
    which agreement reads); ranking the rest would cost as much again as selecting them."""
    first = values.argmax(dim=1, keepdim=True)
    swapped = []
    for t in (values, ids):
        largest = t.gather(1, first)
        t = t.scatter(1, first, t[:, :1])  # column 0's entry goes where the largest was
        t[:, :1] = largest
        swapped.append(t)
    return swapped[0], swapped[1]


def _tail(top_mass: torch.Tensor) -> torch.Tensor:
    """log of the probability outside the top entries, given their float64 total (floored
    at TAIL_FLOOR)."""
    return torch.log((1.0 - top_mass).clamp(min=TAIL_FLOOR))


def distribution_result(spec: int | CompactDistribution, parts: list[dict[str, torch.Tensor]],
                         window_ids: np.ndarray, tokens: np.ndarray,
                         ) -> CompactDistribution | TokenComparison:
    """The per-batch evidence joined and brought to the host."""
    names = (("kld", "kld_reverse", "same_top", "delta_p")
             if isinstance(spec, CompactDistribution)
             else ("top_ids", "top_logp", "tail_logp", "target_logp"))
    joined = {name: torch.cat([p[name] for p in parts if p]).cpu().numpy()
              if any(parts) else None for name in names}
    ids = np.asarray(window_ids, dtype=np.int64).copy()
    counts = np.asarray(tokens, dtype=np.int64).copy()
    if isinstance(spec, CompactDistribution):
        empty = np.zeros(0)
        return TokenComparison(
            ids, counts, *(empty if joined[n] is None else joined[n].astype(np.float64)
                           for n in ("kld", "kld_reverse")),
            np.zeros(0, bool) if joined["same_top"] is None else joined["same_top"],
            empty if joined["delta_p"] is None else joined["delta_p"].astype(np.float64))
    k = int(spec)
    if joined["top_ids"] is None:
        return CompactDistribution(ids, counts, np.zeros((0, k), np.int32),
                                   np.zeros((0, k), np.float32), np.zeros(0, np.float32),
                                   np.zeros(0, np.float32))
    return CompactDistribution(ids, counts, joined["top_ids"], joined["top_logp"],
                               joined["tail_logp"], joined["target_logp"])
