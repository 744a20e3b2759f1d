"""The shared-memory gather transport: real gloo ranks (world sizes 1-4), padding, dtypes, the compiled
op, setup errors that must raise on every rank, and nothing of ours left in /dev/shm.

The per-rank bodies live here (not in workers.py) because they test only this module; spawned ranks
import them from this file.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from dist_utils import run_ranks
from zp_compile import transport
from zp_compile.sharding import ExpertShard, shard_rows, unshard_rows
from zp_compile.transport import SHM_DIR, SHM_PREFIX, ShmExpertExchange

# (layer, slot) -> number of experts, trailing shape, dtype. 5 and 7 experts divide by none of 2, 3, 4;
# 3 experts over 4 ranks leaves rank 3 with only a padding row.
CASES = {
    (0, 0): (5, (4, 3), "float32"),
    (0, 1): (5, (3,), "bfloat16"),
    (1, 0): (7, (2, 6), "bfloat16"),
    (2, 0): (3, (8,), "float32"),
    (2, 1): (4, (), "float32"),  # one value per expert: [E]
    # Quantized shards as stored: FP8 values (scales are float32 keys like the above), MXFP4 blocks.
    (3, 0): (5, (4, 3), "float8_e4m3fn"),
    (3, 1): (7, (2, 16), "uint8"),
}


def _full(key) -> torch.Tensor:
    """The whole [E, ...] bank for a key; the same on every rank (seeded by the key)."""
    num_experts, rest, dtype = CASES[key]
    g = torch.Generator().manual_seed(100 * key[0] + key[1])
    if dtype == "uint8":
        return torch.randint(0, 256, (num_experts, *rest), generator=g, dtype=torch.uint8)
    return torch.randn(num_experts, *rest, generator=g).to(getattr(torch, dtype))


def _own_shards(rank: int, world_size: int) -> dict:
    return {key: shard_rows(_full(key), ExpertShard(CASES[key][0], world_size, rank)) for key in CASES}


def _ours_in(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(SHM_PREFIX))


# ----------------------------------------------------------------------------------------------------
# Per-rank bodies


def roundtrip(rank: int, world_size: int) -> dict:
    shards = _own_shards(rank, world_size)
    exchange = ShmExpertExchange.create(None, shards)
    segment_file = exchange.segment_file
    out: dict = {"file_after_setup": segment_file in os.listdir(SHM_DIR), "keys": {}, "id": exchange.exchange_id, "file": segment_file}
    for key, shard in shards.items():
        num_experts = CASES[key][0]
        full = _full(key)
        got = exchange.gather(key)
        view = exchange.view(key)
        buf = torch.full_like(got, float("nan") if got.is_floating_point() else 255)  # overwritten by the gather
        op = torch.ops.zp_compile.shm_gather(exchange.local(key), exchange.exchange_id)
        out["keys"][str(key)] = {
            "shape": list(got.shape),
            "expected_shape": [world_size * shard.shape[0], *shard.shape[1:]],
            "dtype": str(got.dtype),
            "gather": torch.equal(unshard_rows(got, num_experts), full),
            "padding_zero": bool((got[num_experts:] == 0).all()),
            "view": torch.equal(view, got),
            # Zero-copy: the same memory every time, this rank's rows inside it at row rank * S.
            "view_zero_copy": exchange.view(key).data_ptr() == view.data_ptr()
            and exchange.local(key).data_ptr() == view.data_ptr() + rank * shard.numel() * shard.element_size(),
            "local": torch.equal(exchange.local(key), shard),
            "out": exchange.gather(key, out=buf) is buf and torch.equal(buf, got),
            "op": torch.equal(op, got),
        }
        got.zero_()  # a gather is a private copy: writing into it leaves the shared bank alone
        out["keys"][str(key)]["bank_intact"] = torch.equal(unshard_rows(exchange.gather(key), num_experts), full)
    try:  # the op finds its key by the rows' address: a private copy of the rows names none
        torch.ops.zp_compile.shm_gather(shards[(0, 0)].clone(), exchange.exchange_id)
        out["op_on_a_copy"] = "no error"
    except KeyError as e:
        out["op_on_a_copy"] = str(e)
    local = exchange.local((0, 0))
    exchange.close()
    try:
        torch.ops.zp_compile.shm_gather(local, exchange.exchange_id)
        out["op_after_close"] = "no error"
    except KeyError as e:
        out["op_after_close"] = str(e)
    out["file_after_close"] = segment_file in os.listdir(SHM_DIR)
    return out


def compiled(rank: int, world_size: int, backend: str) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    shards = _own_shards(rank, world_size)
    exchange = ShmExpertExchange.create(None, shards)
    eid = exchange.exchange_id
    w_key, b_key = (0, 0), (0, 1)  # [E, 4, 3] fp32 and [E, 3] bf16, E = 5 (padded)
    num_experts = CASES[w_key][0]

    def layer(x_T4, w_shard, b_shard):
        w_E43 = unshard_rows(torch.ops.zp_compile.shm_gather(w_shard, eid), num_experts)
        b_E3 = unshard_rows(torch.ops.zp_compile.shm_gather(b_shard, eid), num_experts)
        return torch.einsum("th,ehi->tei", x_T4, w_E43) + b_E3.float()

    def zero_copy(x_T4, w_E43, b_E3):
        return torch.einsum("th,ehi->tei", x_T4, w_E43) + b_E3.float()

    shards = {key: exchange.local(key) for key in shards}  # the op is given this rank's rows in the segment
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))
    expected = zero_copy(x, _full(w_key), _full(b_key))
    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(layer, backend=counter, fullgraph=True)
    with torch.inference_mode():
        if backend == "inductor":
            got, codes = run_and_get_code(fn, x, shards[w_key], shards[b_key])
            code = "\n".join(codes)
        else:
            got, code = fn(x, shards[w_key], shards[b_key]), ""
        again = fn(x, shards[w_key], shards[b_key])  # pooled gather outputs of the first call are reused here
        # The zero-copy path: the shared views are ordinary graph inputs, no gather node at all.
        viewed = torch.compile(zero_copy, backend="aot_eager", fullgraph=True)(
            x, unshard_rows(exchange.view(w_key), num_experts), unshard_rows(exchange.view(b_key), num_experts)
        )
    shm_gather = (torch.ops.zp_compile.shm_gather, torch.ops.zp_compile.shm_gather.default)
    ops_in_graph = [n for g in counter.graphs for n in g.graph.nodes if n.target in shm_gather]
    exchange.close()
    return {
        "frames": counter.frame_count,
        "ops_in_graph": len(ops_in_graph),
        "ops_in_code": code.count("torch.ops.zp_compile.shm_gather.default("),
        "max_abs_diff": (got - expected).abs().max().item(),
        "again_max_abs_diff": (again - expected).abs().max().item(),
        "zero_copy_max_abs_diff": (viewed - expected).abs().max().item(),
    }


def setup_errors(rank: int, world_size: int, tmp: str) -> dict:
    """Each bad setup must raise on every rank (none left waiting in a collective), and leave no file."""
    out = {}

    def attempt(name, tensors, **kw):
        try:
            ShmExpertExchange.create(None, tensors, **kw).close()
            out[name] = "no error"
        except (RuntimeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"

    good = {(0, 0): torch.ones(2, 4)}
    attempt("shape_mismatch", {(0, 0): torch.ones(2 + rank, 4)})
    attempt("missing_key", good if rank == 0 else {})
    attempt("dtype_mismatch", {(0, 0): torch.ones(2, 4, dtype=torch.float32 if rank == 0 else torch.bfloat16)})
    attempt("no_shm_dir", good, shm_dir=os.path.join(tmp, "absent"))
    free_bytes = transport._free_bytes
    transport._free_bytes = lambda path: 1024
    try:
        attempt("shm_too_small", good, shm_dir=tmp)
    finally:
        transport._free_bytes = free_bytes
    # Each rank sees its own directory, as ranks on two hosts (or with private /dev/shm) would.
    private = os.path.join(tmp, f"rank{rank}")
    os.makedirs(private, exist_ok=True)
    attempt("private_shm", good, shm_dir=private)
    out["left_in_private"] = _ours_in(private)
    out["left_in_tmp"] = _ours_in(tmp)
    attempt("after_errors", good)  # the process group is still in step on every rank
    return out


# ----------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture
def shm_unchanged():
    """No new file of ours may remain in /dev/shm after the test."""
    before = set(_ours_in(SHM_DIR))
    yield
    assert set(_ours_in(SHM_DIR)) - before == set()


def test_layout_is_page_aligned_and_disjoint():
    meta = {(1, 0): ((3, 5), "bfloat16"), (0, 0): ((2,), "float32"), (0, 1): ((4, 1000), "float32")}
    regions, size = transport._layout(meta, 3)
    spans = sorted((r.offset, r.offset + r.nbytes) for r in regions.values())
    assert [k for k in regions] == [(0, 0), (0, 1), (1, 0)]
    assert all(start % transport._ALIGN == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= size and size % transport._ALIGN == 0
    assert regions[(0, 1)].gathered_shape == (12, 1000) and regions[(0, 1)].nbytes == 3 * 4 * 1000 * 4


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_gather_rebuilds_every_bank(world_size, shm_unchanged):
    results = run_ranks(world_size, roundtrip)
    # The id compiled graphs carry: one per exchange, the same on every rank and at every start (fresh
    # processes: the first exchange), never the segment file's random name (the compile caches key on it).
    assert {r["id"] for r in results} == {f"x0-w{world_size}"} and all(r["id"] not in r["file"] for r in results)
    for rank, result in enumerate(results):
        assert not result["file_after_setup"], f"rank {rank}: segment file still in {SHM_DIR} after setup"
        assert not result["file_after_close"]
        assert "no open shared-memory exchange" in result["op_after_close"]
        assert "not this rank's rows of any key" in result["op_on_a_copy"], result["op_on_a_copy"]
        assert set(result["keys"]) == {str(k) for k in CASES}
        for key, r in result["keys"].items():
            assert r["shape"] == r["expected_shape"], (rank, key)
            checks = {k: v for k, v in r.items() if isinstance(v, bool)}
            assert all(checks.values()), f"rank {rank} key {key}: {checks}"
        assert result["keys"]["(0, 1)"]["dtype"] == "torch.bfloat16"
        assert result["keys"]["(3, 0)"]["dtype"] == "torch.float8_e4m3fn" and result["keys"]["(3, 1)"]["dtype"] == "torch.uint8"


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_compiled_op_is_one_node_per_gather(backend, shm_unchanged):
    for rank, r in enumerate(run_ranks(2, compiled, backend)):
        assert r["frames"] == 1, f"rank {rank}: {r['frames']} graphs (a graph break)"
        assert r["ops_in_graph"] == 2, r
        if backend == "inductor":
            assert r["ops_in_code"] == 2, r
        # fp32 einsum plus a bf16 bias: exact data, only summation order may differ.
        assert r["max_abs_diff"] < 1e-5 and r["again_max_abs_diff"] < 1e-5, r
        assert r["zero_copy_max_abs_diff"] < 1e-5, r


def test_setup_errors_raise_on_every_rank(shm_unchanged):
    with tempfile.TemporaryDirectory(prefix="zp-shm-test-") as tmp:
        results = run_ranks(2, setup_errors, tmp)
        assert _ours_in(tmp) == []
    for rank, r in enumerate(results):
        assert "rank 1 has [3, 4] float32 but rank 0 has [2, 4] float32" in r["shape_mismatch"], r
        assert "rank 1 has no tensor but rank 0 has [2, 4] float32" in r["missing_key"], r
        assert "bfloat16" in r["dtype_mismatch"] and r["dtype_mismatch"].startswith("ValueError"), r
        assert "does not exist" in r["no_shm_dir"], r
        assert "0.0 MiB free but the exchange needs" in r["shm_too_small"], r
        assert "cannot open rank 0's segment" in r["private_shm"] and "rank(s) [1]" in r["private_shm"], r
        assert r["left_in_private"] == [] and r["left_in_tmp"] == [], r
        assert r["after_errors"] == "no error", r


def _one_rank_exchange(bank: torch.Tensor, pool: int = 2) -> ShmExpertExchange:
    """An exchange over an anonymous mapping holding ``bank``, as create() builds for one rank (no group)."""
    import mmap

    region = transport._Region(0, tuple(bank.shape), bank.dtype, 1)
    segment = mmap.mmap(-1, transport._ALIGN * (1 + region.nbytes // transport._ALIGN))
    segment[: region.nbytes] = bank.view(torch.uint8).numpy().tobytes()
    return ShmExpertExchange("test", 0, 1, {(0, 0): region}, segment, pool)


def test_gather_rejects_a_wrong_out_buffer():
    exchange = _one_rank_exchange(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"out is \(2, 4\) torch.float32, key \(0, 0\) gathers to \(2, 3\)"):
        exchange.gather((0, 0), out=torch.empty(2, 4))
    with pytest.raises(KeyError, match="no open shared-memory exchange 'test'"):
        torch.ops.zp_compile.shm_gather(exchange.local((0, 0)), "test")


def test_gather_reuses_an_output_only_once_nothing_holds_it():
    bank = torch.arange(12.0).view(4, 3)
    exchange = _one_rank_exchange(bank, pool=2)
    a, b = exchange.gather((0, 0)), exchange.gather((0, 0))
    assert a.data_ptr() != b.data_ptr()
    c = exchange.gather((0, 0))  # beyond the pool's 2: a plain tensor, never reused
    a_ptr = a.data_ptr()
    a.fill_(-1)
    del a, c
    d = exchange.gather((0, 0))
    assert d.data_ptr() == a_ptr and torch.equal(d, bank)  # reused, and overwritten with the bank
    b_ptr = b.data_ptr()
    b_row = b[1]  # a view keeps b's storage alive
    del b
    e = exchange.gather((0, 0))
    assert e.data_ptr() not in (a_ptr, b_ptr) and torch.equal(e, bank)  # both pooled storages are held
    assert torch.equal(b_row, bank[1])
    del b_row, d, e
    f, g = exchange.gather((0, 0)), exchange.gather((0, 0))
    assert {f.data_ptr(), g.data_ptr()} == {a_ptr, b_ptr}
    assert torch.equal(f, bank) and torch.equal(g, bank)
