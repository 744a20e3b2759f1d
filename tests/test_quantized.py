"""Quantized checkpoints as published (block-FP8, MXFP4 experts): the tiny factory's layouts, their
decoding against transformers' own, sharded loading and logits against the dequantized reference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from zp_compile.models import tiny
from zp_compile.models.loading import CheckpointError, checkpoint_index, load_sharded
from zp_compile.models.quantized import BlockFp8, Mxfp4, codec_for
from zp_compile.models.rewrite import shards
from zp_compile.sharding import ExpertShard

from dist_utils import fake_world, run_ranks
from workers import quantized_logit_error

# Published block-FP8 uses 128 x 128 blocks: sizes of 128 and 256 give whole and partial blocks.
FP8_SIZES = {"hidden": 256, "expert_size": 128}
PUBLISHED = [("qwen3_moe", "fp8"), ("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")]
FP32_TOL = 1e-4


def _fp8_reference(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """transformers' load-time FP8 dequantization (``Fp8Dequantize``) of ``weight``; it derives the block
    from the scale grid, so edge blocks are zero-padded to whole blocks first and cropped after."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    rows, cols = weight.shape[-2:]
    padded = torch.nn.functional.pad(weight.to(torch.float32), (0, -cols % block[1], 0, -rows % block[0]))
    return Fp8Dequantize(None)._dequantize_one(padded.to(torch.float8_e4m3fn), scale, dtype)[..., :rows, :cols]


@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([(), (3,)]),
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    block=st.sampled_from([(128, 128), (64, 32), (1, 128)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fp8_decodes_as_transformers_with_edge_blocks(lead, rows, cols, block, dtype, seed):
    codec = BlockFp8(block)
    weight = torch.randn(*lead, rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    stored = codec.encode(weight)
    assert stored["weight"].dtype == torch.float8_e4m3fn and stored["weight"].shape == weight.shape
    assert stored["scale"].shape == (*lead, -(-rows // block[0]), -(-cols // block[1]))
    decoded = codec.decode(stored, dtype)
    assert decoded.dtype == dtype
    assert torch.equal(decoded, _fp8_reference(stored["weight"], stored["scale"], block, dtype))
    # e4m3 keeps 3 mantissa bits: within 1/16 of the value, or one subnormal step (2^-9) of the block scale.
    scale = stored["scale"].repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    error = (decoded.float() - weight).abs()
    assert (error <= weight.abs() / 16 + scale * 2**-9 + weight.abs() * 2**-8).all()


def test_fp8_encodes_as_transformers_quantizer():
    """Whole blocks: the factory's quantization is transformers' own Fp8Quantize, bit for bit."""
    import types

    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    weight = torch.randn(2, 256, 384) * torch.logspace(-3, 2, 384)
    quantizer = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128)))
    expected = Fp8Quantize(quantizer)._quantize_one("w.weight", weight)
    got = BlockFp8().encode(weight)
    assert torch.equal(got["weight"].view(torch.uint8), expected["w.weight"].view(torch.uint8))
    assert torch.equal(got["scale"], expected["w.weight_scale_inv"])


def test_mxfp4_layout_is_transformers():
    """Nibble order and scale bias, read back through transformers' FP4 table: the value at input index
    2j is the low nibble of byte j, 2j+1 the high one, and the group's scale is 2 ** (byte - 127)."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    values = torch.tensor([0.5, -3.0, 6.0, 1.5] + [0.0] * 28)  # one group of 32 inputs, amax 6: exponent 0
    weight = torch.stack([values, values * 4]).T[None]  # [E=1, in=32, out=2]; output 1 has exponent 2
    stored = Mxfp4().encode(weight)
    blocks, scales = stored["blocks"], stored["scales"]
    assert blocks.shape == (1, 2, 1, 16) and scales.shape == (1, 2, 1)
    assert scales.flatten().tolist() == [127, 129]
    lo, hi = blocks[0, 0, 0, 0].item() & 0xF, blocks[0, 0, 0, 0].item() >> 4
    assert (FP4_VALUES[lo], FP4_VALUES[hi]) == (0.5, -3.0)
    assert torch.equal(Mxfp4().decode(stored, torch.float32), weight)


def test_mxfp4_decodes_every_byte_as_transformers():
    """The plain-torch decode that a compiled graph traces computes transformers' own
    ``convert_moe_packed_tensors`` bit for bit, for every block byte and every scale byte (255: inf)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 1, 16).expand(16, 16, 16, 16).contiguous()  # [E, out, G, 16]
    scales = torch.arange(256, dtype=torch.uint8).reshape(16, 16, 1).expand(16, 16, 16).contiguous()  # [E, out, G]
    for dtype in (torch.float32, torch.bfloat16):
        got = Mxfp4().decode({"blocks": blocks, "scales": scales}, dtype)
        expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert got.dtype == expected.dtype and got.shape == expected.shape == (16, 16 * 32, 16)
        assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    experts=st.integers(1, 4),
    groups=st.integers(1, 3),
    out=st.integers(1, 40),
    log_scale=st.integers(-8, 8),
    seed=st.integers(0, 2**16),
)
def test_mxfp4_rounds_to_the_nearest_value(experts, groups, out, log_scale, seed):
    codec = Mxfp4()
    weight = torch.randn(experts, 32 * groups, out, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    stored = codec.encode(weight)
    decoded = codec.decode(stored, torch.float32)
    assert decoded.shape == weight.shape
    # The group's scale brings its largest value into (3, 6]; the rounding error is at most half
    # of e2m1's gap at the value (0.5 below 2, 1 in [2, 4], 2 in [4, 6]).
    unit = torch.exp2(stored["scales"].to(torch.float32) - 127).repeat_interleave(32, -1).transpose(1, 2)  # [E, in, out]
    assert (weight.abs().reshape(experts, groups, 32, out).amax(2) / unit[:, ::32] <= 6).all()
    assert ((decoded - weight).abs() <= torch.maximum(unit / 4, weight.abs() / 4)).all()
    assert torch.equal(codec.decode(codec.encode(decoded), torch.float32), decoded)  # the values are the grid's


@pytest.mark.parametrize("codec, shape", [(BlockFp8(), (5, 256, 136)), (Mxfp4(), (5, 64, 48))])
def test_a_shard_decodes_alone(codec, shape):
    """Decoding rows [lo, hi) of the stored tensors gives rows [lo, hi) of the decoded bank: a rank
    decodes its shard without the rest."""
    stored = codec.encode(torch.randn(shape))
    bank = codec.decode(stored, torch.bfloat16)
    for lo, hi in [(0, 1), (1, 3), (3, 5)]:
        shard = codec.decode({role: t[lo:hi] for role, t in stored.items()}, torch.bfloat16)
        assert torch.equal(shard, bank[lo:hi])


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("family, method", PUBLISHED)
def test_tiny_checkpoint_is_the_published_layout(checkpoints, family, method):
    path = checkpoints(family, quantization=method, **FP8_SIZES)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = _safetensors(path)
    unconverted = config["modules_to_not_convert"]
    assert "lm_head" in unconverted and "model.embed_tokens" in unconverted
    owner_listed = lambda key: any(key.startswith(m + ".") for m in unconverted)  # noqa: E731
    if method == "fp8":
        assert config == {**config, "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
        fp8 = {k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in fp8  # per-expert keys, as published
        assert "model.layers.0.self_attn.o_proj.weight" in fp8
        for key in fp8:
            assert tensors[key.removesuffix(".weight") + ".weight_scale_inv"].dtype == torch.float32
            assert not owner_listed(key), key
        assert tensors["model.layers.0.mlp.gate.weight"].dtype != torch.float8_e4m3fn
        assert "model.layers.0.mlp.gate" in unconverted and "model.layers.0.input_layernorm" in unconverted
    else:
        assert config == {"quant_method": "mxfp4", "modules_to_not_convert": unconverted}
        packed = {k for k, t in tensors.items() if t.dtype == torch.uint8}
        assert packed == {f"model.layers.{i}.mlp.experts.{p}_{part}" for i in (0, 1) for p in ("gate_up_proj", "down_proj") for part in ("blocks", "scales")}
        assert tensors["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype == torch.bfloat16
        assert "model.layers.0.mlp.router" in unconverted and not owner_listed("model.layers.0.mlp.experts.gate_up_proj_blocks")


@pytest.mark.parametrize("family, method", PUBLISHED)
def test_load_is_transformers_dequantization(checkpoints, family, method):
    """One rank: every tensor is what transformers' own loader gives for the same checkpoint (it
    dequantizes at load without a GPU), bit for bit; and the quantized weights are those of the same
    model saved unquantized, within the format's rounding."""
    from transformers import AutoModelForCausalLM

    path = checkpoints(family, quantization=method, **FP8_SIZES)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    model, _ = load_sharded(path, None, dtype=torch.float32)
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name
    original = AutoModelForCausalLM.from_pretrained(checkpoints(family, dtype=torch.bfloat16, **FP8_SIZES), dtype=torch.float32).state_dict()
    changed = [n for n in state if not torch.equal(state[n], original[n])]
    expert = "model.layers.1.mlp.experts.down_proj"
    assert expert in changed and ("model.layers.1.self_attn.o_proj.weight" in changed) == (method == "fp8")
    for name in changed:
        relative = (state[name] - original[name]).abs().max() / original[name].abs().max()
        assert relative <= (1 / 16 if method == "fp8" else 1 / 4), (name, relative.item())


def _decoded_shards(model, layers) -> dict[str, torch.Tensor]:
    """parameter name -> this rank's [S, ...] rows of it: the stored shards decoded where they are, no gather."""
    out = {}
    for layer in layers:
        module, spec = layer.module, layer.module._zp_gather
        for bank in spec.banks:
            out[f"{layer.path}.{bank.name}"] = bank.decode(shards(module))
    return out


STORED = {"fp8": {"weight": torch.float8_e4m3fn, "scale": torch.float32}, "mxfp4": {"blocks": torch.uint8, "scales": torch.uint8}}


@pytest.mark.parametrize("keep_stored", [True, False])
@pytest.mark.parametrize("family, method", PUBLISHED)
def test_each_rank_reads_its_rows_and_scales_only(checkpoints, family, method, keep_stored):
    """Each rank reads its experts' rows and scales only, and holds them as stored (``keep_stored``) or
    decoded at load: either way its rows decode to those of transformers' dequantized bank."""
    from transformers import AutoModelForCausalLM

    path = checkpoints(family, quantization=method, num_experts=7, **FP8_SIZES)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    world_size = 3
    expert_keys = {k for k in checkpoint_index(path) if ".experts." in k}
    for rank in range(world_size):
        log: list = []
        with fake_world(world_size, rank):
            model, layers = load_sharded(path, dist.group.WORLD, dtype=torch.float32, reader_log=log, keep_stored=keep_stored)
        plan = ExpertShard(7, world_size, rank)
        held = {(layer.index, slot): t for layer in layers for slot, t in shards(layer.module).items()}
        role_of = {(layer.index, slot): role for layer in layers for slot, role in layer.module._zp_gather.roles.items()}
        roles = set(role_of.values())
        if keep_stored:
            assert roles == set(STORED[method]) | ({""} if method == "mxfp4" else set()), roles  # "": a bf16 bias
            for slot, role in role_of.items():
                want = STORED[method].get(role, torch.bfloat16)  # MXFP4 biases: bf16 as stored
                assert held[slot].dtype == want and held[slot].shape[0] == plan.shard_size, (slot, held[slot].dtype)
        else:
            assert roles == {""} and {t.dtype for t in held.values()} == {torch.float32}
        for name, rows in _decoded_shards(model, layers).items():
            assert rows.dtype == torch.float32 and rows.shape == (plan.shard_size, *reference[name].shape[1:]), name
            assert torch.equal(rows[: plan.num_owned], reference[name][plan.start : plan.stop]), name
            assert not rows[plan.num_owned :].any(), name
        read = [(key, rows) for key, rows in log if key in expert_keys]
        # Scales are read with their weights, for the same experts.
        assert any(key.endswith(("_scale_inv", "_scales")) for key, _ in read)
        for key, rows in read:
            assert rows != "all" and plan.start <= rows[0] and rows[1] <= plan.stop, f"rank {rank} read {key} rows {rows}"
        assert len(layers) == 2 and all(hasattr(layer.module, "_zp_gather") for layer in layers)


def test_stacked_fp8_experts_are_read_by_rows(checkpoints, tmp_path):
    """FP8 experts stored stacked (``mlp.experts.gate_up_proj`` [E, ...] + ``gate_up_proj_scale_inv``,
    transformers' naming) and a non-default block size: each rank reads its rows of both and gets its
    rows of the decoded bank."""
    from safetensors.torch import save_file

    src = checkpoints("gpt_oss", num_experts=5, dtype=torch.bfloat16)  # gpt_oss saves its experts stacked
    codec = BlockFp8((32, 16))
    tensors, banks = _safetensors(src), {}
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = codec.encode(tensors[key])
        tensors[key], tensors[key + "_scale_inv"] = stored["weight"], stored["scale"]
        banks[key] = codec.decode(stored, torch.float32)
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 16], "activation_scheme": "dynamic"}
    path = _with_quantization_config(src, tmp_path / "stacked", fp8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for rank in range(3):
        log: list = []
        with fake_world(3, rank):
            model, layers = load_sharded(path, dist.group.WORLD, dtype=torch.float32, reader_log=log)
        plan = ExpertShard(5, 3, rank)
        decoded = _decoded_shards(model, layers)
        for key, bank in banks.items():
            assert torch.equal(decoded[key][: plan.num_owned], bank[plan.start : plan.stop]), key
            assert (key, (plan.start, plan.stop)) in log and (key + "_scale_inv", (plan.start, plan.stop)) in log


@pytest.mark.parametrize("world_size", [1, 4])  # 2 and 3: test_stored_shards_through_both_transports, same cases
def test_sharded_logits_match_dequantized_reference(checkpoints, world_size):
    """Logits (fp32) of ``zp_compile.from_pretrained`` vs the unmodified model that transformers builds
    from the dequantized weights: within 1e-4. With the test below, at every world size from 1 to 4."""
    cases = [
        {"path": str(checkpoints(family, quantization=method, num_experts=6, **FP8_SIZES)), "family": family}
        for family, method in PUBLISHED
    ]
    for rank_results in run_ranks(world_size, quantized_logit_error, cases):
        for r in rank_results:
            assert r["max_abs_diff"] <= FP32_TOL, r
            assert r["logit_scale"] > 0.1, r  # not a vacuous match
            assert r["sharded_layers"] == (2 if world_size > 1 else 0), r


def stored_gathers(rank: int, world_size: int, path: str, cases: list[dict]) -> list[dict]:
    """Per rank (spawned): for each (transport, backend), ``zp_compile.from_pretrained`` logits (fp32)
    vs the model transformers builds from the dequantized weights, with what the rank holds and what
    its gathers deliver; then a step where rank 0 has no tokens and takes part in the gathers alone."""
    from transformers import AutoModelForCausalLM

    import zp_compile
    from zp_compile.passes.predicates import is_shm_gather, is_wait

    from dist_utils import captured_graphs
    from workers import padded_batch

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = padded_batch(rank, ref.config.get_text_config().vocab_size)
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    out = []
    for case in cases:
        torch._dynamo.reset()
        # The graphs are captured as our pass sees them: a hit in Inductor's FX graph cache would skip it.
        with captured_graphs() as graphs, torch._inductor.config.patch(fx_graph_cache=False):
            model = zp_compile.from_pretrained(path, dtype=torch.float32, **case)
            with torch.inference_mode():
                got = model(input_ids=ids, attention_mask=mask).logits
                lone = (ids[:, :0], mask[:, :0]) if rank == 0 else (ids, mask)  # rank 0: nothing to score
                again = model(input_ids=lone[0], attention_mask=lone[1]).logits
        state = model.zero_prefill
        # What each gather delivers, before anything reads it: the wait's output seen through its dtype
        # view, or the shared-memory copy.
        delivered = [
            (next(iter(n.users)) if len(n.users) == 1 and "view" in str(next(iter(n.users)).target) else n).meta["val"].dtype
            for g in graphs for n in g.nodes if is_wait(n) or is_shm_gather(n)
        ]  # fmt: skip
        out.append({
            **case,
            "max_abs_diff": (got - expected)[valid].abs().max().item(),
            "again_max_abs_diff": 0.0 if rank == 0 else (again - expected)[valid].abs().max().item(),
            "logit_scale": expected[valid].abs().max().item(),
            "held": sorted({str(t.dtype) for layer in state.sharded_layers for t in shards(layer.module).values()}),
            "delivered": sorted({str(d) for d in delivered}),
            "gathers": len(delivered),
            "slots": sum(len(layer.module._zp_gather.slots) for layer in state.sharded_layers),
            "expert_bytes": state.expert_bytes,
        })  # fmt: skip
        if state.exchange is not None:
            state.exchange.close()
    return out


HELD = {"fp8": ["torch.float32", "torch.float8_e4m3fn"], "mxfp4": ["torch.bfloat16", "torch.uint8"]}


@pytest.mark.parametrize(
    "world_size, cases",
    [
        (2, [{"transport": "collective", "backend": "eager"}, {"transport": "shm", "backend": "aot_eager"},
             {"transport": "shm", "backend": "eager"}]),
        (3, [{"transport": "shm", "backend": "aot_eager"}]),
    ],
)  # fmt: skip
def test_stored_shards_through_both_transports(checkpoints, world_size, cases):
    """Both transports move the stored shards, compiled and eager (decoding after the blocking gather):
    logits within 1e-4 of the dequantized reference, the ranks hold float8 / uint8 shards with their
    scales, the compiled graph's gathers deliver those dtypes (one per stored tensor), and a rank with
    no tokens takes part in the same gathers in the same order (its peers' logits stay right)."""
    for family, method in PUBLISHED:
        path = str(checkpoints(family, quantization=method, num_experts=6, **FP8_SIZES))
        for rank_results in run_ranks(world_size, stored_gathers, path, cases):
            for r in rank_results:
                assert r["max_abs_diff"] <= FP32_TOL and r["again_max_abs_diff"] <= FP32_TOL, (family, r)
                assert r["logit_scale"] > 0.1 and r["held"] == HELD[method], (family, r)
                if r["backend"] != "eager":
                    assert r["delivered"] == HELD[method] and r["gathers"] == r["slots"] == 12, (family, r)


@pytest.mark.inductor
@pytest.mark.parametrize("family, method", [("qwen3_moe", "fp8"), ("gpt_oss", "mxfp4")])
def test_stored_shards_under_inductor(checkpoints, family, method):
    """Inductor compiles the decoding after the gathers (float8 and e2m1 on CPU): same logits, same
    gathered dtypes."""
    path = str(checkpoints(family, quantization=method, num_experts=6, **FP8_SIZES))
    for r in run_ranks(2, stored_gathers, path, [{"transport": "collective", "backend": "inductor"}]):
        (r,) = r
        assert r["max_abs_diff"] <= FP32_TOL and r["again_max_abs_diff"] <= FP32_TOL, r
        assert r["delivered"] == r["held"] == HELD[method] and r["gathers"] == r["slots"] == 12, r


@pytest.mark.parametrize("family, method", PUBLISHED)
def test_start_up_gather_moves_the_stored_tensors(checkpoints, family, method):
    """What the rank times for t_gather at start-up (``threshold.measure_gather_s``) is the gathers of the
    largest layer's stored tensors, and nothing else: no decoding, every slot, in the stored dtypes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import zp_compile
    from zp_compile.threshold import measure_gather_s

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.calls.append((str(func), out.dtype if isinstance(out, torch.Tensor) else None))
            return out

    path = checkpoints(family, quantization=method, num_experts=6, **FP8_SIZES)
    with fake_world(2) as group:
        model = zp_compile.from_pretrained(path, group, dtype=torch.float32, backend="eager")
        with Record() as record:
            measure_gather_s(model, reps=1)
    slots = len(model.zero_prefill.sharded_layers[0].module._zp_gather.slots)
    gathers = [dtype for op, dtype in record.calls if op == "zp_compile.gather_experts.default"]
    assert len(gathers) == 2 * slots, record.calls  # a warm-up and one timed repetition
    assert sorted({str(d) for d in gathers}) == HELD[method]
    # Nothing decoded: no ATen op but the barrier's allocation.
    assert not [op for op, _ in record.calls if op.startswith("aten.") and not op.startswith("aten.empty")], record.calls


def _with_quantization_config(src, dst, quantization_config):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "quantization_config",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
    ],
)
def test_other_quantization_methods_are_refused_by_name(checkpoints, tmp_path, quantization_config):
    path = _with_quantization_config(checkpoints("qwen3_moe"), tmp_path / "ckpt", quantization_config)
    method = quantization_config["quant_method"]
    with pytest.raises(CheckpointError, match=rf"quantization method '{method}' is not supported; supported: fp8 .* mxfp4"):
        load_sharded(path, None)


def test_fp8_variants_we_do_not_read_are_named(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe", quantization="fp8", **FP8_SIZES)
    base = json.loads((src / "config.json").read_text())["quantization_config"]
    path = _with_quantization_config(src, tmp_path / "static", {**base, "activation_scheme": "static"})
    with pytest.raises(CheckpointError, match="'activation_scheme': 'static'"):
        load_sharded(path, None)
    with pytest.raises(CheckpointError, match="weight_block_size=None"):
        codec_for({**base, "weight_block_size": None})

    from safetensors.torch import save_file

    path = _with_quantization_config(src, tmp_path / "no-scale", base)
    tensors = _safetensors(src)
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj\.weight: .*lacks \['model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight_scale_inv'\]"):
        load_sharded(path, None)


def test_factory_refuses_layouts_that_are_not_published(tmp_path):
    with pytest.raises(ValueError, match="MXFP4 is published for stacked"):
        tiny("qwen3_moe", tmp_path / "a", quantization="mxfp4")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        tiny("qwen3_moe", tmp_path / "b", quantization="int4")


@settings(max_examples=10, deadline=None)
@given(block=st.tuples(st.integers(1, 256), st.integers(1, 256)))
def test_codec_for_reads_the_block_size(block):
    assert codec_for({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block), "activation_scheme": "dynamic"}) == BlockFp8(block)
    assert codec_for(None) is None and codec_for({"quant_method": "mxfp4"}) == Mxfp4()


@pytest.mark.parametrize("family, method", PUBLISHED)
def test_planner_takes_bytes_per_weight_from_the_checkpoint(checkpoints, capsys, family, method):
    """``zp-compile plan --model DIR``: the bank, the shards and the gather are at the checkpoint's
    bytes per weight (scales included), not the hardware profile's."""
    import dataclasses

    from zp_compile import cli
    from zp_compile.costmodel.hardware import HARDWARE
    from zp_compile.costmodel.planning import PlanSettings, gather_s
    from zp_compile.costmodel.spec import load_model
    from zp_compile.models.loading import stored_sizes

    path = checkpoints(family, quantization=method, **FP8_SIZES)
    H, I = FP8_SIZES["hidden"], FP8_SIZES["expert_size"]  # noqa: E741
    weights = 3 * H * I
    if method == "fp8":  # gate and up [I, H] with [1, 2] fp32 scales, down [H, I] with [2, 1]
        expected_experts, expected_linear = (weights + 3 * 2 * 4) / weights, 1.0
    else:  # blocks: half a byte per weight, scales: one byte per 32; biases [2I] and [H] in bf16
        expected_experts, expected_linear = (weights * (0.5 + 1 / 32) + (2 * I + H) * 2) / (weights + 2 * I + H), 2.0
    sizes = stored_sizes(path)
    assert sizes.method == method and sizes.expert_bytes_per_weight == pytest.approx(expected_experts, rel=1e-12)
    if method == "fp8":
        assert 1.0 < sizes.linear_bytes_per_weight < 1.001
    else:
        assert sizes.linear_bytes_per_weight == expected_linear
    assert stored_sizes(checkpoints(family, **FP8_SIZES)) is None

    quantized = load_model(str(path))
    plain = dataclasses.replace(quantized, quantization="", expert_weight_bytes=0.0, linear_weight_bytes=0.0)
    hw = dataclasses.replace(HARDWARE["h100-bf16"], hop_latency_s=0.0)
    s = PlanSettings(gpus=4)
    assert gather_s(quantized, hw, s) / gather_s(plain, hw, s) == pytest.approx(expected_experts / hw.weight_bytes)

    with pytest.raises(SystemExit) as done:
        cli.main(["plan", "--model", str(path), "--hardware", "h100-fp8", "--gpus", "4"])
    assert done.value.code == 0
    assert f"at {expected_experts:.5g} byte(s)/weight ({method} checkpoint, scales included" in capsys.readouterr().out


@pytest.mark.xdist_group("serve")  # one server at a time (pyproject.toml)
@pytest.mark.parametrize("family, method", [("qwen3_moe", "fp8"), ("gpt_oss", "mxfp4")])
def test_serve_answers_like_the_dequantized_model(tmp_path, family, method):
    """``zp-compile serve --model <quantized dir>`` end to end (2 ranks, stored shards gathered as stored,
    packed steps; GPT-OSS: sliding windows and sinks): every prompt position's logprob equals the model
    transformers builds from the dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server_utils import Server
    from zp_compile.models import tiny_with_tokenizer

    path = tiny_with_tokenizer(family, tmp_path / method, quantization=method, dtype=torch.float32, layers=2, num_experts=4,
                               max_position_embeddings=256)  # fmt: skip
    ids = AutoTokenizer.from_pretrained(path).encode("The quick brown fox jumps over the lazy dog, and the dog sleeps")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # transformers dequantizes on CPU
    with torch.inference_mode():
        lp = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    # Eager: the compiled graph of stored gathers is test_stored_shards_through_both_transports's and
    # test_stored_shards_under_inductor's; this is the server's load, steps and answers.
    with Server(path, "--backend", "eager", "--dtype", "float32") as srv:
        r = srv.client.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1})
        assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    want = [*lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist(), lp[-1].max().item()]
    assert got[1:] == pytest.approx(want, abs=FP32_TOL)
