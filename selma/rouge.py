"""ROUGE-L F1 between short texts and near-duplicate filtering of a growing prompt pool.

ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", §3.1) for one candidate
``c`` and one reference ``r`` of m and n tokens:

    P = LCS(c, r) / m,   R = LCS(c, r) / n,   F1 = 2PR / (P + R)

exactly as the ``rouge_score`` package computes ``rougeL`` for a single reference without stemming:
text lowercased, every run of characters outside ``[a-z0-9]`` treated as a separator, and F1 = 0 when
either side has no tokens. SELMA / Self-Instruct reject a new prompt whose highest ROUGE-L F1 against
every prompt already in the pool exceeds a threshold (0.8 for SELMA).

The LCS length is computed bit-parallel (Allison & Dix 1986; Hyyrö 2004): one big-integer update per
token of the second text, so a pool of thousands of prompts is scanned in milliseconds. A multiset
overlap bound (LCS ≤ |bag(c) ∩ bag(r)|) skips pairs that cannot reach the threshold.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
DEFAULT_THRESHOLD = 0.8


def tokenize(text: str) -> list[str]:
    """rouge_score's default tokenisation: lowercase, split on anything that is not [a-z0-9]."""
    return _NON_ALNUM.sub(" ", str(text).lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, exact).

    Bit i of ``v`` is 0 where a[i] ends a matched prefix; per token y of ``b``:
    u = v & M[y];  v = (v + u) | (v - u)  (Hyyrö 2004, Eq. 2); LCS = number of zero bits.
    """
    if not a or not b:
        return 0
    masks = _match_masks(a)
    return _lcs_with_masks(masks, len(a), b)


def _match_masks(tokens: list) -> dict:
    masks: dict = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def _lcs_with_masks(masks: dict, m: int, b: list) -> int:
    full = (1 << m) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def f1_from_lcs(lcs: int, m: int, n: int) -> float:
    """F1 of precision lcs/m and recall lcs/n, which simplifies to 2·lcs / (m + n) (0 without overlap).

    One correctly rounded division: equals rouge_score's 2PR/(P+R) up to the last bit, and a pair that
    sits exactly on the threshold (e.g. 4 of 5 tokens = 0.8) compares as exactly the threshold.
    """
    if lcs == 0 or m == 0 or n == 0:
        return 0.0
    return 2 * lcs / (m + n)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts (symmetric in its arguments)."""
    a, b = tokenize(candidate), tokenize(reference)
    return f1_from_lcs(lcs_length(a, b), len(a), len(b))


@dataclass
class PoolMatch:
    """Best match of a candidate in the pool: ``score`` (max ROUGE-L F1) and the pool text."""

    score: float
    text: str | None


class RougePool:
    """A growing set of texts; ``add_if_novel`` keeps a text only if its max ROUGE-L F1 against every
    text already in the pool is ≤ ``threshold`` (strictly greater is a near-duplicate, as in
    Self-Instruct's ``> 0.7`` rule).

    Token counts are kept per token as numpy columns over the pool, so the multiset-overlap bound of a
    candidate against the whole pool costs one vectorised ``minimum`` per candidate token; exact LCS is
    then computed only for texts, best bound first, whose bound can still beat the best score so far.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, texts=()):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"rouge threshold must be within [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._masks: list[dict] = []
        self._lengths = np.zeros(16, dtype=np.int64)
        self._columns: dict[str, np.ndarray] = {}
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def texts(self) -> list[str]:
        return list(self._texts)

    def add(self, text: str) -> None:
        """Add unconditionally (seed examples)."""
        tokens = tokenize(text)
        row = len(self._texts)
        if row == len(self._lengths):  # grow every column by doubling
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
            for tok, col in self._columns.items():
                self._columns[tok] = np.concatenate([col, np.zeros_like(col)])
        self._lengths[row] = len(tokens)
        for tok, count in Counter(tokens).items():
            col = self._columns.get(tok)
            if col is None:
                col = self._columns[tok] = np.zeros(len(self._lengths), dtype=np.int32)
            col[row] = count
        self._texts.append(text)
        self._tokens.append(tokens)
        self._masks.append(_match_masks(tokens))

    def best_match(self, text: str, stop_above: float | None = None) -> PoolMatch:
        """Highest ROUGE-L F1 of ``text`` against the pool; returns early once a score exceeds
        ``stop_above`` (enough to know the text is a near-duplicate)."""
        tokens = tokenize(text)
        n, size = len(tokens), len(self._texts)
        best = PoolMatch(0.0, None)
        if n == 0 or size == 0:
            return best
        overlap = np.zeros(size, dtype=np.int64)
        for tok, count in Counter(tokens).items():
            col = self._columns.get(tok)
            if col is not None:
                overlap += np.minimum(col[:size], count)
        # LCS ≤ shared tokens counted with multiplicity, so F1 ≤ 2·overlap / (m + n).
        bound = 2.0 * overlap / np.maximum(self._lengths[:size] + n, 1)
        for row in np.argsort(-bound, kind="stable"):
            if bound[row] <= best.score:
                break
            m = int(self._lengths[row])
            score = f1_from_lcs(_lcs_with_masks(self._masks[row], m, tokens), m, n)
            if score > best.score:
                best = PoolMatch(score, self._texts[row])
                if stop_above is not None and score > stop_above:
                    break
        return best

    def add_if_novel(self, text: str) -> PoolMatch:
        """Add ``text`` unless it is a near-duplicate; returns the best match (``score > threshold`` =
        rejected)."""
        match = self.best_match(text, stop_above=self.threshold)
        if match.score <= self.threshold:
            self.add(text)
        return match


def deduplicate(texts, threshold: float = DEFAULT_THRESHOLD, pool=()) -> list[str]:
    """Texts kept in order, each one's max ROUGE-L F1 against ``pool`` and every earlier kept text being
    ≤ ``threshold``."""
    rp = RougePool(threshold, pool)
    return [t for t in texts if rp.add_if_novel(t).score <= threshold]
