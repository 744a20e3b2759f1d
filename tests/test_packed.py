"""The packed attention kernel (``zp_compile.rank.packed``): one FlexAttention call over a step's rows,
against a dense per-row reference for every mask rule (full, sliding window, chunked, attention sinks),
and packed steps of the sliding-window and chunked families against the unmodified model."""

from __future__ import annotations

import pytest
import torch

from zp_compile.contract import BLOCK, Seq, Wants
from zp_compile.rank import packed
from zp_compile.rank.kv_cache import RankKVCache

CPU = torch.device("cpu")

# A step with a 32-token past (2 cached blocks) and rows that read it, read a batch-mate's new tokens,
# read nothing, plus a spare row as the step pads (see rank/kv_cache.py):
#   row 0: past [0, 32), then its 20 new tokens              keys at positions 0..51
#   row 1: past [0, 32), row 0's first new block, 10 new      positions 0..57
#   row 2: 7 new tokens, no prefix                            positions 0..6
P = 32
ROWS = [[0, 20, 0, 2], [20, 30, 2, 5], [30, 37, 5, 6], [37, 37, 6, 6]]
RANGES = [[0, 32], [P, P + 20], [0, 32], [P, P + 16], [P + 20, P + 30], [P + 30, P + 37]]


def dense_reference(q, k, v, rows, ranges, scale, window=0, chunk=0, sinks=None):
    """Per row: its keys gathered, every pair's rule on positions, a plain softmax (with the sink logit)."""
    out = torch.zeros(1, q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype)
    groups = q.shape[1] // k.shape[1]
    for q0, q1, r0, r1 in rows:
        if q1 == q0:
            continue
        keys = torch.cat([k[0, :, a:b] for a, b in ranges[r0:r1]], 1).repeat_interleave(groups, 0)  # [H, m, D]
        vals = torch.cat([v[0, :, a:b] for a, b in ranges[r0:r1]], 1).repeat_interleave(groups, 0)
        m, n = keys.shape[1], q1 - q0
        pq, pk = torch.arange(m - n, m)[:, None], torch.arange(m)[None, :]
        allowed = pk <= pq
        if window:
            allowed &= pq - pk < window
        if chunk:
            allowed &= pq // chunk == pk // chunk
        scores = (q[0, :, q0:q1] @ keys.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # [H, n, m]
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None, None].expand(-1, n, 1)], -1)
        weights = scores.softmax(-1)[..., :m]
        out[0, q0:q1] = (weights @ vals).transpose(0, 1)
    return out


@pytest.mark.parametrize("cpu_kernel", ["flex", "rows"])
@pytest.mark.parametrize(("window", "chunk", "with_sinks"), [(0, 0, False), (0, 0, True), (5, 0, False), (9, 0, True), (0, 16, False)])
def test_one_kernel_call_equals_the_dense_rule(monkeypatch, cpu_kernel, window, chunk, with_sinks):
    """FlexAttention for every rule (what a GPU runs), and the CPU's per-row SDPA where it applies (full
    attention, no sinks: the other rules run FlexAttention on a CPU too)."""
    monkeypatch.setattr(packed, "CPU_KERNEL", cpu_kernel)
    g = torch.Generator().manual_seed(0)
    L, H, Hkv, D = 37, 4, 2, 16
    q = torch.randn(1, H, L, D, generator=g)
    k, v = torch.randn(1, Hkv, P + L, D, generator=g), torch.randn(1, Hkv, P + L, D, generator=g)
    sinks = torch.randn(H, generator=g) if with_sinks else None
    rows, ranges = torch.tensor(ROWS), torch.tensor(RANGES)
    got = torch.ops.zp_compile.packed_attention(q, k, v, rows, ranges, D**-0.5, window, chunk, sinks)
    want = dense_reference(q, k, v, ROWS, RANGES, D**-0.5, window, chunk, sinks)
    assert got.shape == (1, L, H, D)
    assert (got - want).abs().max() <= 1e-5


def test_block_tables_skip_unreachable_tiles_and_mark_full_ones():
    """Two rows of 256 tokens: tile (i, j) of another row is never visited, tiles under the diagonal of
    a row's own tokens are full (no mask evaluated), its diagonal tiles partial; a sliding window of 64
    drops the tiles more than a window behind."""
    rows, ranges = [[0, 256, 0, 1], [256, 512, 1, 2]], [[0, 256], [256, 512]]
    layout = packed.step_layout(rows, ranges, 512, 512)
    kv_num, kv_idx, full_num, full_idx = packed.block_tables(*layout, 512)
    assert kv_num.flatten().tolist() == [1, 1, 1, 1]  # the diagonal
    assert full_num.flatten().tolist() == [0, 1, 0, 1]  # row 0: tile (1, 0); row 1: tile (3, 2)
    assert full_idx[0, 0, 1, 0] == 0 and full_idx[0, 0, 3, 0] == 2
    kv_num, _, full_num, _ = packed.block_tables(*layout, 512, window=64)
    assert kv_num.flatten().tolist() == [1, 2, 1, 2] and full_num.flatten().tolist() == [0, 0, 0, 0]


def _optimized(path, regional: bool = False):
    from transformers import AutoModelForCausalLM

    import zp_compile

    torch._dynamo.reset()
    model = zp_compile.optimize(AutoModelForCausalLM.from_pretrained(path).eval(), backend="aot_eager", dynamic=True, regional=regional)
    packed.enable(model)
    return model


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_sliding_and_chunked_families_run_packed_with_prefix_reuse(checkpoints, family):
    """GPT-OSS (sliding window 8 on every other layer, attention sinks) and Llama 4 (chunks of 64):
    packed steps that reuse cached prefixes and batch-mates' prefixes give the unmodified model's
    logits, prompts longer than the window and crossing a chunk boundary (full attention with
    FlexAttention forced, as a GPU runs it: tests/test_kv_cache.py). GPT-OSS compiled a decoder layer
    at a time, as serving ranks compile it."""
    from transformers import AutoModelForCausalLM

    path = checkpoints(family, layers=2)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    model = _optimized(path, regional=family == "gpt_oss")
    assert packed.unsupported(model) is None
    kv = RankKVCache(1024)
    head = _prompt(1, 48)
    steps = [
        [head + _prompt(2, 30), head[:40] + _prompt(3, 9), _prompt(4, 23)],  # in-step sharing of head's blocks
        [head + _prompt(5, 40), head + _prompt(2, 30), _prompt(6, 70)],  # cached: head's blocks, a full repeat
    ]
    reuse = []
    for prompts in steps:
        seqs = [Seq(p, Wants(top=1)) for p in prompts]
        reuse.append(kv.lookup(seqs)[1])
        with torch.inference_mode():
            got = kv.forward(model, seqs, 0, CPU)
            for row, p in enumerate(prompts):
                want = reference(input_ids=torch.tensor([p])).logits[0, -1]
                assert (got[row] - want).abs().max() <= 1e-4, (family, row)
    whole = lambda n: n // BLOCK * BLOCK  # noqa: E731  (tokens in whole blocks)
    # head[:40] + 9 reads head's whole blocks in the step; then head's 48 tokens, and the full repeat's
    # whole blocks bar the one with its last token.
    assert reuse[0] == [0, whole(40), 0] and reuse[1][0] == 48 and reuse[1][1] == whole(48 + 30 - 1)


def test_each_layer_reads_the_mask_rule_enable_gave_it(checkpoints, monkeypatch):
    """``enable`` gives every attention layer its (window, chunk) once; a step reads it from the module.
    Deriving it from the config at every call made dynamo trace transformers' walk over all layer types
    in every layer: quadratic in depth, half the trace of a 12-layer model."""
    import transformers.cache_utils as cache_utils
    from transformers import AutoModelForCausalLM

    import zp_compile

    walks = []
    real = cache_utils.get_layer_types_and_kwargs
    monkeypatch.setattr(cache_utils, "get_layer_types_and_kwargs", lambda *a, **k: walks.append(1) or real(*a, **k))

    def walks_in_one_step(layers: int) -> int:
        model = AutoModelForCausalLM.from_pretrained(checkpoints("gpt_oss", layers=layers)).eval()
        window = model.config.sliding_window
        model = zp_compile.optimize(model, backend="eager")
        packed.enable(model)
        rules = [getattr(layer.self_attn, packed.RULE) for layer in model.model.layers]
        assert rules == packed.layer_rules(model.config) == [(window, 0), (0, 0)] * (layers // 2)
        walks.clear()
        with torch.inference_mode():
            RankKVCache(0).forward(model, [Seq(_prompt(1, 20), Wants(top=1))], 0, CPU)
        return len(walks)

    assert walks_in_one_step(2) == walks_in_one_step(4)  # per step (its cache), never per layer


def test_layers_the_kernel_does_not_cover_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_next", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=256, num_experts=4, head_dim=16)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert "linear_attention" in packed.unsupported(model)


def test_a_step_reads_its_answers_in_one_device_to_host_copy():
    """Top-k, asked-for tokens and the next token (greedy or drawn) of every row: computed on the device,
    one copy to the host, no per-row ``.tolist()`` / ``.item()`` / ``int()`` on device tensors."""
    from torch.overrides import TorchFunctionMode

    from zp_compile.contract import Sample
    from zp_compile.rank.readouts import readouts

    class Syncs(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("tolist", "item", "cpu", "__int__", "__float__", "__bool__", "__index__", "nonzero"):
                self.calls.append(name)
            return func(*args, **(kwargs or {}))

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    seqs = [Seq([1], Wants(top=3)), Seq([1], Wants(tokens=[4, 7])), Seq([1], Wants(top=1, sample=Sample(0.7, 0.9, 5))),
            Seq([1], Wants(tokens=[9], sample=Sample(1.0)))]  # fmt: skip
    with Syncs() as mode:
        out, _ = readouts(logits, seqs)
    assert mode.calls == ["cpu"]
    lp = torch.log_softmax(logits, -1)
    assert out[0].top == list(zip(lp[0].topk(3).indices.tolist(), lp[0].topk(3).values.tolist()))
    assert out[1].tokens == lp[1, [4, 7]].tolist() and out[1].next == (int(lp[1].argmax()), lp[1].max().item())
    token, token_lp = out[2].next
    assert token_lp == lp[2, token].item()
    again = readouts(logits, seqs)[0][2].next  # seeded: the same draw
    assert again == out[2].next
