import json
from pathlib import Path

import pytest

from dpllm.tasks import dart
from dpllm.tasks.data2text import DataError, group_references

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "assets/data/dart/train_sample.json"


def test_loads_official_json_and_linearises_triples():
    examples = dart.load(SAMPLE)
    entries = json.loads(SAMPLE.read_text())
    assert len(examples) == sum(len(e["annotations"]) for e in entries) == 3007
    first = examples[0]
    assert first.source == (
        "First Clearing | LOCATION | On NYS 52 1 Mi. Youngsville && "
        "On NYS 52 1 Mi. Youngsville | CITY_OR_TOWN | Callicoon, New York"
    )
    assert first.target == entries[0]["annotations"][0]["text"].strip()
    sources, references = group_references(examples)
    assert sum(len(r) for r in references) == len(examples) and len(sources) == len(set(sources))


def test_folder_with_official_names(tmp_path):
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(SAMPLE.read_text())
    assert dart.load(tmp_path, "validation", max_examples=5) == dart.load(SAMPLE, max_examples=5)


@pytest.mark.parametrize(
    "content,match",
    [
        ("[", r"bad\.json:1: not valid JSON"),
        ("{}", r"expected a JSON list"),
        ("[]", r"bad\.json: no examples"),
        ('[{"tripleset": [["a", "b", "c"]]}]', r"entry 0: missing 'annotations'"),
        ('[{"tripleset": [["a", "b"]], "annotations": [{"text": "x"}]}]', r"entry 0: a triple must be"),
        ('[{"tripleset": [], "annotations": [{"text": "x"}]}]', r"entry 0: missing or empty 'tripleset'"),
        ('[{"tripleset": [["a", "b", "c"]], "annotations": [{"text": " "}]}]', r"entry 0: no non-empty annotation"),
        ('[{"tripleset": [["a", "b", "c"]], "annotations": [{"source": "x"}]}]', r"entry 0: an annotation without"),
    ],
)
def test_malformed_files_name_file_and_entry(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        dart.load(path)


def test_hub_dataset_layout(tmp_path):
    """A folder in the hub's layout (annotations as columns) goes through datasets.load_dataset."""
    hub = tmp_path / "dart_hub"
    hub.mkdir()
    rows = [
        {"tripleset": [["A", "r", "B"]], "subtree_was_extended": False, "annotations": {"source": ["s"], "text": ["A r B."]}},
        {"tripleset": [["C", "r", "D"]], "subtree_was_extended": False, "annotations": {"source": ["s", "t"], "text": ["x", "y"]}},
    ]
    (hub / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = dart.load(str(hub), "validation")
    assert [(e.source, e.target) for e in examples] == [("A | r | B", "A r B."), ("C | r | D", "x"), ("C | r | D", "y")]


def test_a_folder_without_the_official_file_names_what_it_looked_for(tmp_path):
    (tmp_path / "train.json").write_text(SAMPLE.read_text())  # official content, not the official name
    with pytest.raises(DataError, match=r"no dart-v1\.1\.1-full-train\.json for split 'train'"):
        dart.load(tmp_path, "train")


def test_non_utf8_file_names_the_file(tmp_path):
    bad = tmp_path / "dart-v1.1.1-full-train.json"
    bad.write_bytes(b'[{"tripleset": [["a", "b", "\xff"]], "annotations": [{"text": "x"}]}]')
    with pytest.raises(DataError, match=rf"{bad}: not valid UTF-8"):
        dart.load(tmp_path, "train")
