from pathlib import Path

import torch
from transformers import AutoTokenizer

from dpllm.generation import generate
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["name[The Eagle], food[French]\n", "name[A]\n", "name[Blue Spice], eatType[pub], area[riverside]\n"]


def _setup():
    """A random model whose outputs differ from prompt to prompt: left alone, its first token is a
    newline for every prompt (generation cuts there), and empty strings would hide a mask or order bug."""
    tok = AutoTokenizer.from_pretrained(REPO / "assets/models/stories260K")
    model = tiny_model("llama", vocab=512, hidden=32, dtype=torch.float64, seed=3, tied=False)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids("<0x0A>")] = 0.0  # newline logit 0: rarely the largest
    return model, tok


def _distinct(outputs: list[str]) -> bool:
    return all(outputs) and len(set(outputs)) == len(outputs)


@torch.no_grad()
def _manual_greedy(model, tok, prompt, max_new_tokens):
    """Reference: argmax of the full forward at every step, one unpadded prompt, no cache."""
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token == tok.eos_token_id:
            break
        new.append(token)
    return tok.decode(new, skip_special_tokens=True).split("\n", 1)[0].strip()


def test_greedy_matches_manual_argmax_decoding_in_a_padded_batch():
    model, tok = _setup()
    out = generate(model, tok, PROMPTS, num_beams=1, max_new_tokens=12, batch_size=3)
    assert out == [_manual_greedy(model, tok, p, 12) for p in PROMPTS] and _distinct(out)
    assert model.training  # mode restored


def test_batched_beam_search_equals_one_prompt_at_a_time():
    model, tok = _setup()
    batched = generate(model, tok, PROMPTS, num_beams=4, max_new_tokens=10, batch_size=3)
    single = [generate(model, tok, [p], num_beams=4, max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single and len(batched) == len(PROMPTS) and _distinct(batched)
