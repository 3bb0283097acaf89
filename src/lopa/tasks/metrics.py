"""Metrics for tasks and benchmarks: accuracy, macro-F1, pass@k, generation metrics (exact match,
ROUGE-L, perplexity) and 95% confidence intervals.

Pure Python on purpose: they run on a handful of numbers, and the benchmark scripts must not need
scikit-learn or scipy. ROUGE-L comes from Google's maintained ``rouge-score`` package.

Example::

    >>> from lopa.tasks.metrics import accuracy, macro_f1, pass_at_k
    >>> accuracy([1, 0, 1], [1, 1, 1])
    0.6666666666666666
    >>> round(macro_f1([0, 0, 1], [0, 1, 1]), 4)
    0.6667
    >>> pass_at_k(n=2, c=1, k=1)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% Student-t critical values for 1..30 degrees of freedom; beyond that a Cornish-Fisher
# correction of the normal quantile is accurate to < 1e-3, which is plenty for reporting.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
        2.056, 2.052, 2.048, 2.045, 2.042]
_Z95 = 1.959963984540054


def _check_pair(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label.

    >>> accuracy([0, 1, 1, 0], [0, 1, 0, 0])
    0.75
    """
    _check_pair(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence[int], labels: Sequence[int],
             classes: Sequence[int] | None = None) -> float:
    """Unweighted mean of per-class F1.

    ``classes`` defaults to every class seen in the labels or the predictions (as scikit-learn's
    ``f1_score(average="macro")`` does). A class that is predicted but never true, or true but never
    predicted, has F1 = 0; a class named in ``classes`` that occurs in neither also counts as 0
    (scikit-learn's ``zero_division=0``), so pass ``classes`` only when that is what you want.

    >>> macro_f1([0, 0, 0], [0, 0, 1])  # class 1 never predicted: (0.8 + 0) / 2
    0.4
    """
    _check_pair(preds, labels)
    cls = sorted(set(labels) | set(preds)) if classes is None else list(classes)
    if not cls:
        raise ValueError("no classes to average over")
    f1s = []
    for c in cls:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        # F1 = 2tp / (2tp + fp + fn) avoids the 0/0 of precision or recall alone.
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return sum(f1s) / len(f1s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al. 2021, "Codex").

    ``1 - C(n-c, k) / C(n, k)``, computed as a running product so that large ``n`` neither
    overflows nor loses precision.

    >>> round(pass_at_k(10, 3, 1), 12)
    0.3
    >>> pass_at_k(5, 4, 2)  # fewer than k failures: some pair always contains a pass
    1.0
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def normalize_answer(text: str) -> str:
    """Whitespace-insensitive form for exact match: surrounding whitespace dropped, inner runs collapsed.

    >>> normalize_answer("  def f(x):\\n    return x \\n")
    'def f(x): return x'
    """
    return " ".join(text.split())


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> list[bool]:
    """Per item: does the prediction equal the reference, up to whitespace (:func:`normalize_answer`)?

    >>> exact_match([" 4", "5 "], ["4", "6"])
    [True, False]
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)]


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Per item ROUGE-L F-measure (longest common subsequence of tokens) from ``rouge-score``.

    rouge-score's tokenizer lower-cases and keeps runs of letters and digits only (punctuation and
    whitespace separate words); no stemming, so code identifiers and JSON keys are compared whole.

    >>> [round(x, 3) for x in rouge_l(["the cat sat", "a b"], ["the cat sat down", "c d"])]
    [0.857, 0.0]
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]


def perplexity(total_logprob: float, n_tokens: int) -> float:
    """``exp(-total_logprob / n_tokens)``: the perplexity of the completions, per token.

    >>> round(perplexity(-2 * math.log(4), 2), 6)
    4.0
    """
    if n_tokens <= 0:
        raise ValueError(f"need n_tokens > 0, got {n_tokens}")
    return math.exp(-total_logprob / n_tokens)


def _t95(df: int) -> float:
    if df <= len(_T95):
        return _T95[df - 1]
    z = _Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a two-sided 95% Student-t interval ``(mean, low, high)`` (e.g. over seeds).

    With a single value the interval is undefined and returned as ``(x, nan, nan)``.

    >>> [round(x, 3) for x in mean_ci95([1.0, 2.0, 3.0])]
    [2.0, -0.484, 4.484]
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = _t95(n - 1) * math.sqrt(var / n)
    return mean, mean - half, mean + half


def paired_difference_ci95(a: Sequence[bool | int], b: Sequence[bool | int]) -> tuple[float, float, float]:
    """Difference in accuracy of two systems scored on the same items, ``mean(a) - mean(b)``, and its
    95% interval from the per-item differences (a paired test: far tighter than comparing two
    separate intervals, since both systems get most items equally right or wrong).

    >>> d, lo, hi = paired_difference_ci95([1, 1, 1, 0] * 50, [1, 0, 1, 0] * 50)
    >>> round(d, 3), round(lo, 3), round(hi, 3)
    (0.25, 0.189, 0.311)
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("need at least two paired items")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean, lo, hi = mean_ci95(diffs)
    return mean, lo, hi


def proportion_ci95(k: int, n: int) -> tuple[float, float, float]:
    """Proportion ``k/n`` and its 95% Wilson score interval ``(p, low, high)``.

    Wilson rather than the normal approximation because benchmark accuracies sit near 0 or 1
    where the latter leaves [0, 1].

    >>> p, lo, hi = proportion_ci95(8, 10)
    >>> p, round(lo, 4), round(hi, 4)
    (0.8, 0.4902, 0.9433)
    """
    if n <= 0:
        raise ValueError(f"need n > 0, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _Z95
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)
