from pathlib import Path

import pytest

from dpllm.tasks import glue
from dpllm.tasks.data2text import DataError

REPO = Path(__file__).resolve().parents[2]
SST2 = REPO / "assets/data/glue/SST-2"


def test_sst2_folder_and_file():
    dev = glue.load("sst2", SST2, "validation")
    assert len(dev) == 872 and {e.label for e in dev} == {0, 1} and dev[0].text_b is None
    assert glue.load("sst2", SST2 / "train.tsv", max_examples=3) == glue.load("sst2", SST2, "train", 3)


@pytest.mark.parametrize(
    "task,header,row,expected",
    [
        ("qnli", "index\tquestion\tsentence\tlabel", "0\tWho?\tHe did.\tnot_entailment", ("Who?", "He did.", 1)),
        ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tA?\tB?\t1", ("A?", "B?", 1)),
        ("mnli", "index\tsentence1\tsentence2\tgold_label", "0\tP.\tH.\tcontradiction", ("P.", "H.", 2)),
    ],
)
def test_pair_tasks_map_columns_and_labels(tmp_path, task, header, row, expected):
    path = tmp_path / "train.tsv"
    path.write_text(f"{header}\n{row}\n")
    (ex,) = glue.load(task, tmp_path, "train")
    assert (ex.text_a, ex.text_b, ex.label) == expected


@pytest.mark.parametrize(
    "content,match",
    [
        ("", r"bad\.tsv:1: expected columns"),
        ("sentence\tlabel\n", r"bad\.tsv: no examples"),
        ("sentence\tlabel\ngood\t1\nbad\n", r"bad\.tsv:3: expected 2 tab-separated fields"),
        ("sentence\tlabel\ngood\t7\n", r"bad\.tsv:2: label '7' is not one of"),
        ("sentence\tlabel\n \t1\n", r"bad\.tsv:2: empty text"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        glue.load("sst2", path)


def test_hub_layout(tmp_path):
    hub = tmp_path / "glue_hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text('{"question": "Q?", "sentence": "S.", "label": 1, "idx": 0}\n')
    (ex,) = glue.load("qnli", str(hub), "train")
    assert (ex.text_a, ex.text_b, ex.label) == ("Q?", "S.", 1)


def test_accuracy_and_qqp_f1_by_hand():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert glue.scores(preds, labels, "sst2") == {"accuracy": 0.75}
    # QQP: tp = 2, fp = 1, fn = 0 -> F1 = 4 / 5
    assert glue.scores(preds, labels, "qqp") == {"accuracy": 0.75, "f1": 0.8}


def test_non_utf8_tsv_names_the_file(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\nhello \xff\t1\n")
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.tsv'}: not valid UTF-8"):
        glue.load("sst2", tmp_path, "train")
