from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dpllm.lm import IGNORE_INDEX
from dpllm.tasks import e2e
from dpllm.tasks.data2text import DataError, Example, group_references, tokenize

REPO = Path(__file__).resolve().parents[2]


def test_loads_embedded_sample():
    rows = e2e.load(REPO / "assets/data/e2e/train.csv")
    assert len(rows) == 4000 and rows[0].source.startswith("name[The Vaults]")


@pytest.mark.parametrize(
    "content,match",
    [
        ("", r"bad\.csv:1: expected a header"),
        ("mr,text\na,b\n", r"bad\.csv:1: expected a header with columns 'mr' and 'ref'"),
        ("mr,ref\n", r"bad\.csv: no examples"),
        ('mr,ref\n"name[A]",fine\n"name[B]"\n', r"bad\.csv:3: expected 2 fields"),
        ('mr,ref\n"name[A]",fine\n"name[B]",x,extra\n', r"bad\.csv:3: expected 2 fields"),
        ('mr,ref\n"name[A]",\n', r"bad\.csv:2: empty ref"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        e2e.load(path)


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("mr,ref\nname[Caf\xe9],x\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        e2e.load(path)
    with pytest.raises(DataError, match="no such file"):
        e2e.load(tmp_path / "absent.csv")


def test_loss_only_on_target_and_truncation():
    tok = AutoTokenizer.from_pretrained(REPO / "assets/models/stories260K")
    ex = Example("name[The Eagle], food[French]", "The Eagle serves French food.")
    encoded, truncated = tokenize(ex, tok, 1000)
    prompt_len = len(tok(ex.source + "\n")["input_ids"])
    assert not truncated and len(encoded["input_ids"]) == len(encoded["labels"])
    assert encoded["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded["labels"][prompt_len:] == encoded["input_ids"][prompt_len:]
    assert encoded["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(encoded["input_ids"][prompt_len:-1]).strip() == ex.target
    short, truncated = tokenize(ex, tok, 10)
    assert truncated and len(short["input_ids"]) == 10


def test_references_grouped_by_input_in_first_appearance_order(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text('mr,ref\n"name[A]",a1\n"name[B]",b1\n"name[A]",a2\n')
    sources, references = group_references(e2e.load(path))
    assert sources == ["name[A]", "name[B]"] and references == [["a1", "a2"], ["b1"]]


def test_folder_with_official_names_and_hub_layout(tmp_path):
    (tmp_path / "devset.csv").write_text('mr,ref\n"name[A]",a1\n')
    assert e2e.load(tmp_path, "validation") == [Example("name[A]", "a1")]
    hub = tmp_path / "e2e_hub"
    hub.mkdir()
    (hub / "train.csv").write_text('meaning_representation,human_reference\n"name[A]",a1\n"name[B]",b1\n')
    assert e2e.load(str(hub), "train") == [Example("name[A]", "a1"), Example("name[B]", "b1")]
    (hub / "train.csv").write_text("mr,text\nx,y\n")
    with pytest.raises(DataError, match="missing"):
        e2e.load(str(hub), "train")


def test_a_folder_without_the_official_file_names_what_it_looked_for(tmp_path):
    (tmp_path / "train.csv").write_text("mr,ref\nname[A],A.\n")
    with pytest.raises(DataError, match=r"no trainset\.csv for split 'train'"):
        e2e.load(tmp_path, "train")
