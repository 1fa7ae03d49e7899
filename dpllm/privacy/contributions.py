"""Per-sample gradient contributions and the algebra the clipper needs on them.

A layer call contributes to a parameter's per-sample gradient in one of two forms:

* ``Outer``: ``sum_t left[b, t] (outer) right[b, t]``, an (m, n) matrix per sample, kept as
  its factors. ``left`` is dense (B, T, m) or, for embeddings, token ids (B, T) standing for
  one-hot rows of width ``m``. Norms and inner products come from T x T Gram matrices
  ("ghost norms"), so the B x m x n per-sample gradients are never built.
* ``Dense``: the per-sample gradient itself, (B, *param.shape).

Everything here is computed in ``acc_dtype`` (fp32 or fp64) whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Outer:
    left: Tensor  # (B, T, m) float, or (B, T) int64 ids when ``onehot_dim`` is set
    right: Tensor  # (B, T, n)
    onehot_dim: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        m = self.onehot_dim if self.onehot_dim is not None else self.left.shape[-1]
        return m, self.right.shape[-1]

    @property
    def length(self) -> int:
        return self.right.shape[1]

    def prefers_direct(self) -> bool:
        """Ghost norms cost ~2T^2 per sample, the direct gradient m*n: pick the smaller."""
        m, n = self.shape
        return 2 * self.length**2 >= m * n


@dataclass
class Dense:
    value: Tensor  # (B, *param.shape)


Contribution = Outer | Dense


def cast(c: Contribution, dtype: torch.dtype) -> Contribution:
    if isinstance(c, Dense):
        return Dense(c.value.to(dtype))
    left = c.left if c.onehot_dim is not None else c.left.to(dtype)
    return Outer(left, c.right.to(dtype), c.onehot_dim)


def zero_samples(c: Contribution, keep: Tensor) -> Contribution:
    """Zero the rows of dropped samples so their (possibly non-finite) values cannot leak."""

    def mask(x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        return torch.where(keep.view(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))

    if isinstance(c, Dense):
        return Dense(mask(c.value))
    left = c.left if c.onehot_dim is not None else mask(c.left)
    return Outer(left, mask(c.right), c.onehot_dim)


def materialize(c: Outer) -> Dense:
    """The per-sample gradients (B, m, n) of an outer-product contribution."""
    if c.onehot_dim is None:
        return Dense(torch.bmm(c.left.transpose(1, 2), c.right))
    bsz, length = c.left.shape
    m, n = c.shape
    flat = torch.zeros(bsz * m, n, dtype=c.right.dtype, device=c.right.device)
    rows = (c.left + m * torch.arange(bsz, device=c.left.device).unsqueeze(1)).reshape(-1)
    flat.index_add_(0, rows, c.right.reshape(-1, n))
    return Dense(flat.view(bsz, m, n))


def _view_key(x: Tensor) -> tuple:
    """Live tensors with equal keys read the same memory the same way, so they hold equal values."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype


def _left_gram(a: Outer, b: Outer) -> Tensor:
    """(B, Ta, Tb) inner products between the left factors of ``a`` and ``b``."""
    if a.onehot_dim is None and b.onehot_dim is None:
        return torch.bmm(a.left, b.left.transpose(1, 2))
    if a.onehot_dim is not None and b.onehot_dim is not None:
        return (a.left.unsqueeze(2) == b.left.unsqueeze(1)).to(a.right.dtype)
    if a.onehot_dim is not None:
        return _left_gram(b, a).transpose(1, 2)
    # a dense (B, Ta, m), b one-hot ids (B, Tb): entry [t, s] = a.left[t, ids_b[s]]
    index = b.left.unsqueeze(1).expand(-1, a.left.shape[1], -1)
    return a.left.gather(2, index)


def _right_gram(a: Outer, b: Outer, cache: dict | None) -> Tensor:
    """(B, Ta, Tb) Gram of the right factors; layers fed the same input (q/k/v, gate/up) share it."""
    x, y = a.right, b.right
    key = None
    if cache is not None and _view_key(x) == _view_key(y):
        key = _view_key(x)
        if key in cache:
            return cache[key]
    gram = torch.bmm(x, y.transpose(1, 2))
    if key is not None:
        cache[key] = gram
    return gram


def inner(a: Contribution, b: Contribution, cache: dict | None = None) -> Tensor:
    """Per-sample Frobenius inner products <a_i, b_i>, shape (B,).

    ``cache`` (a dict living for one backward pass) lets contributions that share a right
    factor share its Gram matrix.
    """
    if isinstance(a, Dense) and isinstance(b, Dense):
        return (a.value * b.value).flatten(1).sum(1)
    if isinstance(a, Outer) and isinstance(b, Outer):
        return (_left_gram(a, b) * _right_gram(a, b, cache)).sum((1, 2))  # einsum would copy both to bmm them
    outer, dense = (a, b) if isinstance(a, Outer) else (b, a)
    # <sum_t l_t r_t^T, P> = sum_t l_t^T P r_t
    if outer.onehot_dim is None:
        projected = torch.bmm(outer.left, dense.value)  # (B, T, n)
    else:
        index = outer.left.unsqueeze(-1).expand(-1, -1, dense.value.shape[-1])
        projected = dense.value.gather(1, index)  # rows P[ids_t]
    return (projected * outer.right).sum((1, 2))


def weighted_sum(c: Contribution, weights: Tensor, scaled: dict | None = None, out: Tensor | None = None) -> Tensor:
    """sum_i weights[i] * c_i: the clipped sum for one contribution, parameter-shaped; added into
    ``out`` (any contiguous tensor with as many elements) when given, with no full-size temporary.

    The smaller factor is scaled by the weights (the right one on a tie). ``scaled`` (a dict
    living for one clipped sum pass) keeps the last scaled right factor, so layers fed the same
    input (q/k/v, gate/up), whose sums are formed one after another, scale it once.
    """
    if isinstance(c, Dense):
        values = c.value.reshape(c.value.shape[0], -1)
        if out is None:
            return torch.tensordot(weights, c.value, dims=1)
        out.view(-1).addmv_(values.t(), weights.to(values.dtype))
        return out
    m, n = c.shape
    w = weights.view(-1, 1, 1)
    if c.onehot_dim is not None:
        if out is None:
            out = torch.zeros(m, n, dtype=c.right.dtype, device=c.right.device)
        out.view(m, n).index_add_(0, c.left.reshape(-1), (c.right * w).reshape(-1, n))
        return out
    left, right = c.left, c.right
    last = scaled.get("source") if scaled is not None else None
    if last is not None and _view_key(last) == _view_key(right):
        right = scaled["scaled"]
    elif m < n:
        left = left * w
    else:
        right = right * w
        if scaled is not None:  # the source is held, so its memory cannot be reused by another tensor
            scaled.update(source=c.right, scaled=right)
    if out is None:
        return left.reshape(-1, m).t().mm(right.reshape(-1, n))
    out.view(m, n).addmm_(left.reshape(-1, m).t(), right.reshape(-1, n))
    return out


L1_CHUNK = 1 << 24  # per-sample gradient entries built at once for L1 norms


def _samples(c: Contribution, start: int, stop: int) -> Contribution:
    if isinstance(c, Dense):
        return Dense(c.value[start:stop])
    return Outer(c.left[start:stop], c.right[start:stop], c.onehot_dim)


def l1_norms(contribs: list[Contribution]) -> Tensor:
    """Per-sample L1 norms of the sum of ``contribs`` (one parameter's), shape (B,).

    L1 has no Gram shortcut: the per-sample gradients are built, at most ``L1_CHUNK`` entries at a
    time. Embedding lookups alone (one-hot left factors) are summed per distinct (sample, id) row
    instead, so a vocabulary-sized per-sample table is never built for them."""
    if all(isinstance(c, Outer) and c.onehot_dim is not None for c in contribs):
        return _onehot_l1(contribs)
    first = contribs[0]
    bsz = _batch_of(first)
    numel = first.value[0].numel() if isinstance(first, Dense) else first.shape[0] * first.shape[1]
    per = max(1, L1_CHUNK // max(numel, 1))
    out = []
    for start in range(0, bsz, per):
        total = None
        for c in contribs:
            part = _samples(c, start, start + per)
            value = (materialize(part) if isinstance(part, Outer) else part).value.reshape(_batch_of(part), -1)
            total = value if total is None else total + value
        out.append(total.abs().sum(1))
    return torch.cat(out)


def _batch_of(c: Contribution) -> int:
    return c.value.shape[0] if isinstance(c, Dense) else c.right.shape[0]


def _onehot_l1(contribs: list[Outer]) -> Tensor:
    m = contribs[0].onehot_dim
    bsz, n = contribs[0].right.shape[0], contribs[0].right.shape[-1]
    offsets = m * torch.arange(bsz, device=contribs[0].left.device).unsqueeze(1)
    keys = torch.cat([(c.left + offsets).reshape(-1) for c in contribs])
    values = torch.cat([c.right.reshape(-1, n) for c in contribs])
    rows, index = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(rows.numel(), n, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    out = torch.zeros(bsz, dtype=values.dtype, device=values.device)
    return out.index_add_(0, torch.div(rows, m, rounding_mode="floor"), summed.abs().sum(1))
