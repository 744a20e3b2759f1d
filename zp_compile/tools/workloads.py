"""Synthetic prefill-only request streams: a paper-like mix, and plain random prompts.

The paper's real workload (MoralStories, MMLU, BoolQ, IMDB, QuALITY, ArXiv classification; 50 to 128K
tokens, output length 1) cannot be downloaded here, so ``paper_mix`` synthesises requests with the
shapes that matter to a prefill scheduler: prompt lengths and shared prefixes. The distributions below
are our modelling choices, approximating the public datasets' typical sizes in Llama/Qwen tokens; they
are not measured from the datasets:

| dataset | share | prompt | shared prefix |
|---|---|---|---|
| mmlu (5-shot classification) | 0.35 | question: lognormal, median 90, sigma 0.5 | 5-shot exemplars per subject (57 subjects): median 550, sigma 0.3 |
| boolq (passage + yes/no question) | 0.20 | passage median 130, sigma 0.45, + question 12 | none |
| imdb (review sentiment) | 0.25 | review median 230, sigma 0.75, 20..2,500 | none |
| quality (long article, many questions) | 0.10 | question median 30 | article median 4,500, sigma 0.3, 2,000..8,000; 20 questions per article |
| arxiv (document classification) | 0.10 | document median 9,000, sigma 0.6, 1,000..128K | none |

Every prompt is clipped to ``max_context``. Token ids are random (the model's numerics are irrelevant to
throughput); requests that share a prefix share its exact ids, so prefix caches can hit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    dataset: str
    token_ids: list[int] = field(repr=False)
    prefix_len: int  # leading tokens shared with other requests of the same group (0: none)
    group: str | None  # the sharing group, e.g. "mmlu/17"

    def __len__(self) -> int:
        return len(self.token_ids)


SHARES = {"mmlu": 0.35, "boolq": 0.20, "imdb": 0.25, "quality": 0.10, "arxiv": 0.10}


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int = 1, hi: int | None = None) -> int:
    n = round(rng.lognormvariate(0.0, sigma) * median)
    return max(lo, n if hi is None else min(hi, n))


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # 0..2 are left for pad/bos/eos


def paper_mix(n: int, *, seed: int = 0, vocab: int = 32000, max_context: int = 8192) -> list[Request]:
    """``n`` requests of the paper-like mix, in a shuffled arrival order (deterministic for ``seed``)."""
    if n < 0 or max_context < 2 or vocab < 4:
        raise ValueError(f"need n >= 0, max_context >= 2 and vocab >= 4; got n={n}, max_context={max_context}, vocab={vocab}")
    rng = random.Random(seed)
    prefixes: dict[str, list[int]] = {}

    def prefix(group: str, median: float, sigma: float, lo: int, hi: int) -> list[int]:
        if group not in prefixes:
            prefixes[group] = _ids(rng, _lognormal(rng, median, sigma, lo, hi), vocab)
        return prefixes[group]

    out = []
    names, weights = zip(*SHARES.items())
    quality_questions = 0
    for _ in range(n):
        dataset = rng.choices(names, weights)[0]
        shared, group = [], None
        if dataset == "mmlu":
            group = f"mmlu/{rng.randrange(57)}"
            shared = prefix(group, 550, 0.3, 200, 1500)
            own = _lognormal(rng, 90, 0.5, 10, 600)
        elif dataset == "boolq":
            own = _lognormal(rng, 130, 0.45, 20, 800) + 12
        elif dataset == "imdb":
            own = _lognormal(rng, 230, 0.75, 20, 2500)
        elif dataset == "quality":
            group = f"quality/{quality_questions // 20}"  # 20 questions per article
            quality_questions += 1
            shared = prefix(group, 4500, 0.3, 2000, 8000)
            own = _lognormal(rng, 30, 0.4, 8, 120)
        else:
            own = _lognormal(rng, 9000, 0.6, 1000, 128_000)
        ids = (shared + _ids(rng, own, vocab))[:max_context]
        out.append(Request(dataset, ids, min(len(shared), len(ids)), group))
    return out


def random_prompts(n: int, length: int, *, seed: int = 0, vocab: int = 32000) -> list[Request]:
    """``n`` prompts of exactly ``length`` random tokens, no prefix sharing (the synthetic workload)."""
    if n < 0 or length < 1:
        raise ValueError(f"need n >= 0 and length >= 1; got n={n}, length={length}")
    rng = random.Random(seed)
    return [Request("random", _ids(rng, length, vocab), 0, None) for _ in range(n)]
