import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_config(family: str, tied: bool = True, bias: bool = False, hidden: int = 32, vocab: int = 96):
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(attention_bias=bias, **common)
    return Qwen2Config(**common)  # Qwen2 always has q/k/v biases


def tiny_model(family="llama", tied=True, bias=False, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(family, tied, bias, **kw)
    cls = LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM
    model = cls(cfg).to(dtype)
    # Random non-unit norm weights so that the norm layers' gradients are exercised.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def tiny_batch(vocab=96, lengths=(10, 7, 10, 4), prompt=3, seed=1):
    """Right-padded batch with prompt tokens and padding masked from the loss."""
    from dpllm.lm import collate

    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate(examples, pad_id=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
