"""E2E and DART metrics: the official scorer's numbers, and hand-worked examples."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpllm.tasks import e2e
from dpllm.tasks.data2text import DataError, group_references, read_predictions
from dpllm.tasks.metrics import MetricInputError, _bleu, dart_scores, e2e_scores, nist

SCORER = Path(__file__).resolve().parents[1] / "data/e2e_scorer"

# Printed by the official E2E scorer on these files (tests/data/e2e_scorer/README.md).
OFFICIAL = {
    "dev_simple_template": dict(bleu=0.5481, nist=4.8560, meteor=0.3205, rouge_l=0.6021, cider=1.2444),
    "dev_first_reference_of_previous_mr": dict(bleu=0.3912, nist=6.0487, meteor=0.3412, rouge_l=0.5220, cider=1.2373),
}


@pytest.mark.slow
@pytest.mark.parametrize("system", sorted(OFFICIAL))
def test_e2e_scores_match_the_official_scorer(system):
    _, references = group_references(e2e.load(SCORER / "devset.csv"))
    predictions = read_predictions(SCORER / f"{system}.txt", len(references))
    scores = e2e_scores(predictions, references)
    for name, official in OFFICIAL[system].items():
        tolerance = 0.02 if name == "meteor" else 0.005
        assert scores[name] == pytest.approx(official, rel=tolerance), name
        # The scorer prints 4 decimals; the port agrees to that precision.
        assert abs(scores[name] - official) <= 5e-5 + 1e-9, name


@pytest.mark.slow
def test_official_scores_need_no_system_java():
    # A fresh machine may have no Java: the scorer's Java programs must run on the one pip installs.
    path = str(Path(sys.executable).parent)
    assert shutil.which("java", path=path) is None
    official_test = f"{__file__}::test_e2e_scores_match_the_official_scorer[dev_simple_template]"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", official_test],
        env={**os.environ, "PATH": path},
        cwd=SCORER.parents[2],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert "1 passed" in run.stdout


def test_bleu_hand_worked():
    # hyp: the cat sat on the mat / ref: the cat sat on a mat (lower-cased, equal length: BP = 1)
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert _bleu(["The cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, rel=1e-9)
    # Closest reference length, and the empty reference that pads the shorter group ignored:
    # input 1 "a b c d" (refs of 4 and 2 words -> 4), input 2 "e f" (one ref of 4 words -> 4,
    # not the padding's 0). All clipped precisions are 1; BP = exp(1 - 8/6).
    corpus = _bleu(["a b c d", "e f"], [["a b c d", "x y"], ["e f g h"]])
    assert corpus == pytest.approx(math.exp(1 - 8 / 6), rel=1e-9)
    # hyp of 4 words against a 6-word reference: BP = exp(1 - 6/4); precisions 1, 1, 1, 1.
    assert _bleu(["the cat sat on"], [["the cat sat on a mat"]]) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-9)


def test_nist_hand_worked():
    refs = [["a b", "a c"]]
    # info(a) = log2(4/2) = 1, info(b) = log2(4/1) = 2, info(a b) = log2(count(a)/count(a b)) = 1.
    # "a b": unigrams (1 + 2) / 2 words + bigram 1 / 1 = 2.5; mean reference length 4 / 2 = 2: no penalty.
    assert nist(["a b"], refs) == pytest.approx(2.5, rel=1e-12)
    # "a": 1 / 1 word, length ratio 1/2: penalty exp(-beta log(0.5)^2), beta = -log(0.5) / log(1.5)^2.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert nist(["A"], refs) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), rel=1e-12)
    # Groups of different sizes: the mean reference length counts only real references,
    # (2 + 2 + 3) words over 3 references across 2 inputs -> 7 / 1.5 per input.
    refs2 = [["a b", "a c"], ["d e f"]]
    score = nist(["a b", "d e f"], refs2)
    assert score > 0 and nist(["a b", "d"], refs2) < score


@pytest.mark.slow
def test_e2e_coco_metrics_hand_worked():
    # PTB tokenisation lower-cases and drops the final period. ROUGE-L (COCO): LCS 4
    # ("cat sat on mat"), P = 4/6, R = 4/7, F = (1 + 1.2^2) P R / (R + 1.2^2 P).
    scores = e2e_scores(["The cat sat on the mat."], [["a cat sat on a mat today"]])
    p, r = 4 / 6, 4 / 7
    assert scores["rouge_l"] == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), rel=1e-9)
    perfect = e2e_scores(["the cat sat on the mat", "dogs run"], [["the cat sat on the mat"], ["dogs run"]])
    assert perfect["bleu"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["meteor"] > 0.9


@pytest.mark.slow
def test_dart_scores_hand_worked():
    # TER: one insertion ("the") over a 6-word reference. ROUGE-L with two references is
    # GEM's jackknife: mean over leave-one-out sets of the best F -> (F(ref1) + F(ref2)) / 2 = (1 + 0) / 2.
    scores = dart_scores(["the cat sat on mat"], [["the cat sat on the mat"]])
    assert scores["ter"] == pytest.approx(1 / 6, rel=1e-9)
    two = dart_scores(
        ["the cat sat on the mat", "dogs run in the park"],
        [["the cat sat on the mat", "birds fly high"], ["dogs run in the park"]],
    )
    assert two["rouge_l"] == pytest.approx((0.5 + 1.0) / 2)
    three = dart_scores(["the cat sat"], [["the cat sat", "birds fly high", "The cat sat."]])
    assert three["rouge_l"] == pytest.approx(1.0)
    assert two["bleu"] == pytest.approx(1.0) and 0 < two["meteor"] <= 1
    # GEM's TER is sacrebleu's with normalized=True, case_sensitive=False: punctuation is split off and case
    # ignored, so "The cat sat, on the mat." against "the cat sat on mat ." is two deletions ("," and "the")
    # over 6 reference words; GEM's BLEU is lower-cased.
    mixed = dart_scores(["The cat sat, on the mat.", "The Dogs RUN in the park"], [["the cat sat on mat ."], ["the dogs run in the park"]])
    assert mixed["ter"] == pytest.approx(2 / 12, rel=1e-9)  # corpus TER: (2 + 0) edits / (6 + 6) words
    assert dart_scores(["The Dogs RUN in the park"], [["the dogs run in the park"]])["bleu"] == pytest.approx(1.0)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(MetricInputError, match="2 predictions for 1 inputs"):
        nist(["a", "b"], [["a"]])
    with pytest.raises(MetricInputError, match="input 0 has no reference"):
        nist(["a"], [[" "]])
    with pytest.raises(MetricInputError, match="no predictions"):
        nist([], [])
    preds = tmp_path / "preds.txt"
    preds.write_text("one\ntwo\nthree\n")
    with pytest.raises(DataError, match=r"preds\.txt:3: more predictions than the 2 inputs"):
        read_predictions(preds, 2)
    with pytest.raises(DataError, match=r"preds\.txt:4: missing predictions: 3 lines for 5 inputs"):
        read_predictions(preds, 5)
    preds.write_text("")
    with pytest.raises(DataError, match=r"preds\.txt: empty file"):
        read_predictions(preds, 2)
    assert read_predictions(SCORER / "dev_simple_template.txt", 547)[0] == "Alimentum is a place in the city centre."


@pytest.mark.slow
def test_dart_scores_equal_gem_metrics_output():
    """BLEU, TER and METEOR on mixed-case outputs, against GEM-metrics' own numbers (tests/data/dart_gem)."""
    data = Path(__file__).resolve().parents[1] / "data/dart_gem"
    predictions = (data / "predictions.txt").read_text(encoding="utf-8").splitlines()
    references = json.loads((data / "references.json").read_text(encoding="utf-8"))
    gem = json.loads((data / "gem_scores.json").read_text())
    ours = dart_scores(predictions, references)
    assert round(ours["bleu"] * 100, 5) == gem["bleu"]
    assert round(ours["ter"] * 100, 5) == gem["ter"]
    assert ours["meteor"] == pytest.approx(gem["meteor"], abs=1e-6)
