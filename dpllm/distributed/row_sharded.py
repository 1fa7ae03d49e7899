"""Vocabulary matrices under FSDP2 that no rank ever holds whole.

FSDP2 gathers a unit whole, and while it copies the gathered buffer into the parameter both are
alive: two copies of the unit on every rank. For an untied embedding or output head (V x H, the
largest tensors of a language model: 32k x 1024 here, 128k x 4096 in Llama 3) that transient
outweighs every decoder layer. Row sharding keeps the dim-0 piece FSDP2 would keep, as a DTensor
on the same mesh (so the hand-over, the optimizer, checkpoints and the streamed save treat it as
any FSDP2 shard), and gathers it in blocks of at most ``BLOCK_ELEMENTS``:

    block k   rows [k c, (k + 1) c) of every rank's piece, all-gathered (N c rows, rank-major);
              rank r's piece starts at global row r S, S = ceil(V / N), as torch.chunk cuts it
    input     each block fills the output positions whose ids fall in it
    output    each block computes its columns of the logits; the input's gradient gathers the
              blocks again in backward (FSDP2 gathers a unit again there too)

Every rank runs the same blocks whatever its batch, so the collectives stay matched (data-parallel
ranks look up different ids). Neither module gives its weight an autograd gradient: the private
step's clipper forms each weight's clipped sum from the layer's input and output gradient, and
the sharded step hands it to the pieces. ``bf16`` gathers the blocks in bf16, as FSDP2's
``MixedPrecisionPolicy`` gathers the other units under precision=bf16-mixed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

BLOCK_ELEMENTS = 2**22  # gathered per block: 16 MB in fp32


class _Blocks:
    """The gather plan of one (V, H) matrix over ``world`` ranks."""

    def __init__(self, weight, world: int, bf16: bool) -> None:
        self.weight, self.world, self.bf16 = weight, world, bf16
        self.vocab, self.hidden = weight.shape
        self.rows = math.ceil(self.vocab / world)  # S: the rows of a full piece
        self.block = max(1, min(self.rows, BLOCK_ELEMENTS // max(1, world * self.hidden)))

    def __iter__(self):
        """(first local row, rows in block, the block's global row of each gathered row)."""
        for start in range(0, self.rows, self.block):
            n = min(self.block, self.rows - start)
            global_rows = (torch.arange(self.world).unsqueeze(1) * self.rows + start + torch.arange(n)).flatten()
            yield start, n, global_rows

    def gather(self, start: int, n: int) -> Tensor:
        """Rows [start, start + n) of every rank's piece, rank-major (a short piece pads with zeros)."""
        local = self.weight.to_local().detach()
        dtype = torch.bfloat16 if self.bf16 else local.dtype
        mine = torch.zeros((n, self.hidden), dtype=dtype, device=local.device)
        have = max(0, min(n, local.shape[0] - start))
        if have:
            mine[:have] = local[start : start + have]
        out = torch.empty((self.world * n, self.hidden), dtype=dtype, device=local.device)
        dist.all_gather_single(out, mine)
        return out


class _BlockedLookup(torch.autograd.Function):
    """W[ids] with W gathered a block of rows at a time. The output is part of the graph when the
    weight trains (the clipper's tap needs the gradient reaching it), but gives W no gradient."""

    @staticmethod
    def forward(ctx, ids: Tensor, local: Tensor, plan: _Blocks) -> Tensor:
        dtype = torch.bfloat16 if plan.bf16 else local.dtype
        out = torch.zeros((*ids.shape, plan.hidden), dtype=dtype, device=ids.device)
        piece, offset = ids // plan.rows, ids % plan.rows
        for start, n, _ in plan:
            rows = plan.gather(start, n)
            hit = (offset >= start) & (offset < start + n)
            out[hit] = rows[piece[hit] * n + offset[hit] - start]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, None, None


class RowShardedEmbedding(nn.Embedding):
    """nn.Embedding whose weight is a row-sharded DTensor (see the module docstring)."""

    def forward(self, ids: Tensor) -> Tensor:
        return _BlockedLookup.apply(ids, self.weight.to_local(), _Blocks(self.weight, *self._row_sharding))


def _blocks_of_rows(plan: _Blocks, device: torch.device):
    """Each block's rows that exist (a short last piece's padding dropped) and their global row."""
    for start, n, global_rows in plan:
        w = plan.gather(start, n)
        keep = global_rows < plan.vocab
        if not keep.all():
            w = w[keep.to(w.device)]
        yield w, global_rows[keep].to(device)


class _BlockedLinear(torch.autograd.Function):
    """x W^T with W gathered a block of rows at a time, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Blocks) -> Tensor:
        ctx.plan = plan
        logits = torch.empty((*x.shape[:-1], plan.vocab), dtype=x.dtype, device=x.device)
        for w, columns in _blocks_of_rows(plan, x.device):
            logits.index_copy_(-1, columns, nn.functional.linear(x, w.to(x.dtype)))
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = None  # summed over blocks in fp32 at least, rounded once as one matmul would
        for w, columns in _blocks_of_rows(ctx.plan, grad.device):
            part = (grad.index_select(-1, columns) @ w.to(grad.dtype)).to(torch.promote_types(grad.dtype, torch.float32))
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(grad.dtype), None


class RowShardedLinear(nn.Linear):
    """A bias-free nn.Linear (an output head) whose weight is a row-sharded DTensor. Computes in
    bf16 when its blocks are gathered in bf16 or autocast runs, as an FSDP2 unit would."""

    def forward(self, x: Tensor) -> Tensor:
        plan = _Blocks(self.weight, *self._row_sharding)
        if plan.bf16:
            x = x.to(torch.bfloat16)
        elif torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return _BlockedLinear.apply(x, plan)


def shard_rows(module: nn.Module, mesh, bf16: bool = False) -> None:
    """Turn ``module`` (an nn.Embedding, or an nn.Linear without bias, its weight whole on every
    rank) into its row-sharded form, keeping this rank's torch.chunk piece of the weight."""
    from torch.distributed.tensor import DTensor, Shard

    if type(module) is nn.Embedding:
        if module.max_norm is not None:  # renormalises the rows it looks up, in place
            raise ValueError("row sharding covers embeddings without max_norm")
        cls = RowShardedEmbedding
    elif type(module) is nn.Linear and module.bias is None:
        cls = RowShardedLinear
    else:
        raise ValueError(f"row sharding covers nn.Embedding and bias-free nn.Linear, not {type(module).__name__}")
    full = module.weight
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = math.ceil(full.shape[0] / world)
    local = full.detach()[min(rank * rows, full.shape[0]) : min((rank + 1) * rows, full.shape[0])].clone()
    piece = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
    module.weight = nn.Parameter(piece, requires_grad=full.requires_grad)
    module._row_sharding = (world, bf16)
    module.__class__ = cls
