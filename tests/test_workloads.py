"""The synthetic request streams: deterministic, clipped, and sharing exactly the prefixes they claim."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from zp_compile.tools.workloads import SHARES, paper_mix, random_prompts


def test_deterministic_for_a_seed():
    assert [r.token_ids for r in paper_mix(50, seed=3)] == [r.token_ids for r in paper_mix(50, seed=3)]
    assert [r.token_ids for r in paper_mix(50, seed=3)] != [r.token_ids for r in paper_mix(50, seed=4)]


def test_mix_shares_and_lengths():
    requests = paper_mix(4000, seed=0, max_context=8192, vocab=1000)
    counts = Counter(r.dataset for r in requests)
    for name, share in SHARES.items():
        assert abs(counts[name] / len(requests) - share) < 0.03, (name, counts)
    assert all(1 <= len(r) <= 8192 for r in requests)
    assert all(3 <= t < 1000 for r in requests[:200] for t in r.token_ids)
    imdb = statistics.median(len(r) for r in requests if r.dataset == "imdb")
    assert 180 < imdb < 290  # median 230 by construction
    assert max(len(r) for r in requests if r.dataset == "arxiv") == 8192  # long documents are clipped


def test_shared_prefixes_are_identical_ids():
    requests = paper_mix(2000, seed=1)
    groups: dict[str, list] = {}
    for r in requests:
        if r.group:
            groups.setdefault(r.group, []).append(r)
    shared = [g for g in groups.values() if len(g) > 1]
    assert shared, "some subjects and articles must repeat"
    for g in shared:
        n = g[0].prefix_len
        assert n > 0 and all(r.prefix_len == n and r.token_ids[:n] == g[0].token_ids[:n] for r in g)
    assert all(r.prefix_len == 0 for r in requests if r.dataset in ("boolq", "imdb", "arxiv"))


def test_random_prompts():
    requests = random_prompts(5, 256, seed=2, vocab=100)
    assert [len(r) for r in requests] == [256] * 5 and all(r.prefix_len == 0 for r in requests)


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 1, "max_context": 1}, {"n": 1, "vocab": 3}])
def test_bad_arguments_are_named(kwargs):
    with pytest.raises(ValueError, match="need"):
        paper_mix(**kwargs)
