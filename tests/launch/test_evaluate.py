import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from launch.evaluate import main
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "assets/data/e2e/dev.csv"  # 400 rows, 46 unique MRs


def test_prediction_count_mismatch_names_file_and_line(tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    preds.write_text("a prediction\n" * 45)
    with pytest.raises(SystemExit):
        main(["--task", "e2e", "--predictions", str(preds), "--eval-file", str(DEV)])
    assert "preds.txt:46: missing predictions: 45 lines for 46 inputs" in capsys.readouterr().err


def test_malformed_eval_file_is_reported(tmp_path, capsys):
    bad = tmp_path / "dev.csv"
    bad.write_text('mr,ref\n"name[A]"\n')
    with pytest.raises(SystemExit):
        main(["--task", "e2e", "--predictions", str(bad), "--eval-file", str(bad)])
    assert "dev.csv:2: expected 2 fields" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-inputs", "--num-beams", "--max-new-tokens", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_must_be_positive(tmp_path, capsys, flag, value):
    preds = tmp_path / "preds.txt"
    preds.write_text("a prediction\n" * 43)  # what --max-inputs -3 would have silently scored
    with pytest.raises(SystemExit):
        main(["--task", "e2e", "--predictions", str(preds), "--eval-file", str(DEV), flag, value])
    assert f"argument {flag}: must be a positive integer, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_generate_from_checkpoint_and_score(tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(REPO / "assets/models/stories260K")
    model = tiny_model("llama", vocab=512, hidden=32, dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    args = ["--task", "e2e", "--checkpoint", str(tmp_path / "ckpt"), "--eval-file", str(DEV)]
    assert main(args + ["--max-inputs", "3", "--num-beams", "2", "--max-new-tokens", "8"]) == 0
    out = tmp_path / "eval_e2e"
    assert len((out / "predictions.txt").read_text().splitlines()) == 3
    assert (out / "inputs.txt").read_text().splitlines()[0].startswith("name[")
    results = json.loads((out / "results.json").read_text())
    assert results["inputs"] == 3 and set(results["scores"]) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert "BLEU" in capsys.readouterr().out
