"""Row-sharded vocabulary matrices (FSDP2's untied embeddings) against the whole modules, with
each data-parallel rank looking up its own ids, pieces of unequal and zero rows, several blocks."""

import pytest
import torch
from torch import nn

from dpllm.distributed import row_sharded
from dpllm.distributed.env import DistEnv
from dpllm.distributed.local import run_on_ranks
from dpllm.lm import forward_per_sample_loss
from dpllm.privacy.clipper import PerSampleClipper
from tests.conftest import tiny_batch, tiny_model


def _compare(env, vocab: int, hidden: int, block_elements: int, bf16: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    row_sharded.BLOCK_ELEMENTS = block_elements
    torch.manual_seed(0)  # the same weights on every rank, as after rank 0's broadcast
    embedding, head = nn.Embedding(vocab, hidden).double(), nn.Linear(hidden, vocab, bias=False).double()
    whole_embedding, whole_head = nn.Embedding(vocab, hidden).double(), nn.Linear(hidden, vocab, bias=False).double()
    whole_embedding.load_state_dict(embedding.state_dict())
    whole_head.load_state_dict(head.state_dict())
    mesh = init_device_mesh("cpu", (env.world_size,))
    row_sharded.shard_rows(embedding, mesh, bf16=bf16)
    row_sharded.shard_rows(head, mesh, bf16=bf16)
    torch.manual_seed(100 + env.rank)  # each rank its own batch
    ids = torch.randint(vocab, (2, 7))
    x = torch.randn(2, 7, hidden, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, vocab, dtype=torch.float64)
    logits = head(x)
    (logits.double() * grad).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    dtype = torch.bfloat16 if bf16 else torch.float64
    ref_logits = nn.functional.linear(x_ref.to(dtype), whole_head.weight.to(dtype))
    (ref_logits.double() * grad).sum().backward()
    return {
        "local_rows": embedding.weight.to_local().shape[0],
        "lookup_in_graph": embedding(ids).requires_grad,
        "lookup": float((embedding(ids).detach().double() - whole_embedding.weight.to(dtype)[ids].double()).abs().max()),
        "lookup_dtype": embedding(ids).dtype,
        "logits": float((logits.double() - ref_logits.double()).abs().max()),
        "grad_x": float((x.grad - x_ref.grad).abs().max() / x_ref.grad.abs().max()),
        "weight_grad": head.weight.grad,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, vocab, block, pieces",
    [(2, 11, 3 * 2 * 5, [6, 5]), (3, 10, 10**6, [4, 4, 2]), (4, 5, 1, [2, 2, 1, 0])],
    ids=["uneven-pieces-several-blocks", "one-block", "an-empty-piece-row-blocks"],
)
def test_row_sharded_modules_equal_the_whole_ones(world, vocab, block, pieces):
    results = run_on_ranks(world, _compare, vocab, 5, block, False)
    assert [r["local_rows"] for r in results] == pieces  # torch.chunk's pieces, as FSDP2 cuts them
    for r in results:
        assert r["lookup"] == 0 and r["lookup_dtype"] == torch.float64
        assert r["lookup_in_graph"]  # the clipper's tap on the embedding sees its output gradient
        assert r["logits"] < 1e-12 and r["grad_x"] < 1e-12  # (relative)
        assert r["weight_grad"] is None  # the clipper forms the weight's sum, autograd never does


@pytest.mark.slow
def test_row_sharded_modules_gather_bf16_blocks_under_bf16_mixed():
    for r in run_on_ranks(2, _compare, 11, 5, 10, True):
        assert r["lookup"] == 0 and r["lookup_dtype"] == torch.bfloat16
        assert r["logits"] == 0  # each logit is one bf16 dot product, whatever the block
        assert r["grad_x"] <= 2**-7  # bf16 blocks summed in fp32: within bf16's rounding of one matmul


def test_row_sharding_refuses_what_it_cannot_shard():
    from unittest import mock

    mesh = mock.Mock(size=lambda: 2, get_local_rank=lambda: 0)
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        row_sharded.shard_rows(nn.Linear(4, 8), mesh)
    with pytest.raises(ValueError, match="max_norm"):
        row_sharded.shard_rows(nn.Embedding(8, 4, max_norm=1.0), mesh)


def _clipped_sums(env, block_elements: int) -> tuple:
    """One clipped backward of an untied Qwen2 (vocabulary 97: pieces of 49 and 48 rows), every
    rank on the same batch; under FSDP2 (2 ranks) the embeddings are row-sharded."""
    from dpllm.distributed.fsdp import shard_from_rank0

    row_sharded.BLOCK_ELEMENTS = block_elements
    model = tiny_model("qwen2", tied=False, dtype=torch.float64, vocab=97)
    sums = {}
    clipper = PerSampleClipper(model, 1.0, verify_first_backward=False, grad_sink=lambda n, s: sums.__setitem__(n, s))
    if env.world_size > 1:
        clipper.release_parameters()
        shard_from_rank0(model, env, torch.device("cpu"))
        clipper.rebind(dict(model.named_parameters()))
        assert isinstance(model.lm_head, row_sharded.RowShardedLinear)
    norms = clipper.backward(forward_per_sample_loss(model, tiny_batch(vocab=97)))
    return norms, sums


@pytest.mark.slow
def test_fsdp2_with_row_sharded_embeddings_clips_as_the_whole_model():
    """Per-sample norms and every clipped sum, the embeddings' included, as on the unsharded model."""
    norms, sums = _clipped_sums(DistEnv(), 2**22)
    for sharded_norms, sharded_sums in run_on_ranks(2, _clipped_sums, 2 * 32 * 5):  # blocks of 5 rows per rank
        torch.testing.assert_close(sharded_norms, norms, rtol=1e-12, atol=0)
        assert set(sharded_sums) == set(sums) and sums["model.embed_tokens.weight"] is not None
        for name, value in sums.items():
            torch.testing.assert_close(sharded_sums[name], value, rtol=1e-12, atol=1e-14, msg=name)
