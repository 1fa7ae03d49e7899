from pathlib import Path

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


def save_untied_qwen2(path: Path, vocab: int = 512) -> Path:
    """A tiny Qwen2 with untied input and output embeddings (row-sharded under FSDP2) and the
    embedded model's tokenizer (512 ids: ``vocab`` must be at least that), saved at ``path``."""
    from transformers import AutoTokenizer

    tiny_model("qwen2", tied=False, vocab=vocab, hidden=64).save_pretrained(path)
    AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets/models/stories260K").save_pretrained(path)
    return path


def save_tiny_bert(path: Path, sst2: Path, seed: int = 0, dropout: float = 0.0) -> Path:
    """A random 2-layer BERT classifier with a word-level vocabulary from SST-2 rows, saved at ``path``.

    Dropout is off unless asked for: its masks come from each process's generator, so runs on
    different world sizes would differ for that reason alone."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from dpllm.tasks import glue

    path.mkdir(parents=True, exist_ok=True)
    words = sorted({w for e in glue.load("sst2", sst2, "train", 300) for w in e.text_a.split()})
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
