"""Deployment planner: FLOP and byte counts against hand counts, config mapping against transformers'
own models, the paper's headline figures within a band, and the CLI. Pure arithmetic: no timing asserts."""

from __future__ import annotations

import dataclasses
import json

import pytest

from zp_compile import cli
from zp_compile.costmodel.calibrate import ForwardTiming, calibration_layers, forward_flops, time_forward
from zp_compile.costmodel.flops import _keys, flops_per_request
from zp_compile.costmodel.hardware import HARDWARE, cpu_hardware, hardware, measure_cpu, rank_threads
from zp_compile.costmodel.planning import PlanSettings, _batch_layers, gather_s, memory_per_gpu, plan, predict_threshold
from zp_compile.costmodel.spec import MODELS, ModelSpec, load_model, spec_from_config

# 2 layers: layer 0 dense (MLP width 5), layer 1 MoE (4 experts of width 6, top-2); 2 query heads of
# width 4 sharing 1 KV head; hidden 8; vocabulary 10.
TOY = ModelSpec("toy", layers=2, hidden=8, vocab=10, heads=2, kv_heads=1, head_dim=4, experts=4, top_k=2,
                expert_ffn=6, moe_layers=(1,), dense_ffn=5)


def test_flops_per_request_hand_count():
    attn = 8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8  # q + k, v + o = 192
    norms = 2 * 8
    layer0 = attn + norms + 3 * 8 * 5  # + gated MLP
    layer1 = attn + norms + 8 * 4 + 2 * 3 * 8 * 6  # + router + 2 active experts
    assert TOY.active_params_per_token == layer0 + layer1 == 856
    # 3 new tokens after 2 cached: positions 3, 4, 5 see 3 + 4 + 5 keys; QK^T and PV cost
    # 2 * heads * (qk + v) FLOPs per key, in both layers; the lm_head runs at the last position only.
    expected = 2 * 856 * 3 + 2 * (2 * 2 * (4 + 4) * (3 + 4 + 5)) + 2 * 8 * 10
    assert flops_per_request(TOY, new=3, cached=2) == expected == 6064
    assert flops_per_request(TOY, new=0, cached=7) == 0


def test_flops_split_across_a_cached_prefix_add_up():
    head = 2 * TOY.hidden * TOY.vocab
    whole = flops_per_request(TOY, 700)
    assert flops_per_request(TOY, 300) + flops_per_request(TOY, 400, cached=300) - head == pytest.approx(whole)


@pytest.mark.parametrize("cached, new, window", [(0, 1, 0), (0, 9, 4), (2, 3, 4), (5, 6, 4), (0, 4, 4), (4, 1, 4), (0, 0, 3), (10, 7, 0)])
def test_causal_key_counts_match_brute_force(cached, new, window):
    brute = sum(min(p, window) if window else p for p in range(cached + 1, cached + new + 1))
    assert _keys(cached, new, window) == brute


def test_memory_hand_count_qwen3_30b_bf16_8_gpus():
    m, hw = MODELS["qwen3-30b-a3b"], HARDWARE["h100-bf16"]
    attn = 2048 * 32 * 128 * 2 + 2048 * 4 * 128 * 2  # q, o + k, v
    per_layer = attn + 2048 * 128 + 2 * 2048  # + router + 2 norms
    dense = (48 * per_layer + 2 * 151936 * 2048 + 2048) * 2  # + untied embeddings, lm_head, final norm; BF16
    expert = 3 * 2048 * 768 * 2  # one expert, bytes
    shard = 128 // 8 * expert
    paper = memory_per_gpu(m, hw, PlanSettings(gpus=8))
    assert paper.dense == dense == 3_082_162_176
    assert paper.expert_shards == 47 * shard + 128 * expert == 8_304_721_920  # first MoE layer whole
    assert paper.in_flight == 2 * 128 * expert  # prefetch 1: the layer in use and the next
    assert paper.fits and paper.offloaded_layers == 0
    assert memory_per_gpu(m, hw, PlanSettings(prefetch=2)).in_flight == 3 * 128 * expert
    all_sharded = memory_per_gpu(m, hw, PlanSettings(gpus=8, resident_first_layer=False))
    assert all_sharded.expert_shards == 48 * shard == 7_247_757_312


def test_fp8_keeps_embeddings_norms_and_router_in_bf16():
    m = MODELS["qwen3-30b-a3b"]
    bf16, fp8 = (memory_per_gpu(m, HARDWARE[h], PlanSettings()) for h in ("h200-bf16", "h200-fp8"))
    attn = 2048 * 32 * 128 * 2 + 2048 * 4 * 128 * 2
    assert bf16.dense - fp8.dense == 48 * attn  # only attention projections halve
    assert fp8.expert_shards * 2 == bf16.expert_shards


def test_more_gpus_than_experts_pads_the_shards():
    m, hw = MODELS["mixtral-8x7b"], HARDWARE["h100-bf16"]
    mem = memory_per_gpu(m, hw, PlanSettings(gpus=16, resident_first_layer=False))
    assert mem.expert_shards == 32 * m.expert_params * 2  # one (partly padding) row per layer
    assert mem.in_flight == 2 * 16 * m.expert_params * 2  # 16 gathered rows, 8 of them padding


def test_shard_rows_follow_the_sharding_module():
    from zp_compile.costmodel.planning import _shard_rows
    from zp_compile.sharding import ExpertShard

    for experts, n in [(128, 8), (8, 16), (10, 4), (3, 1)]:
        assert _shard_rows(dataclasses.replace(TOY, experts=experts, top_k=1), n) == ExpertShard(experts, n, 0).shard_size


def test_hybrid_offload_when_hbm_runs_out():
    m = MODELS["qwen3-235b-a22b"]
    kept = memory_per_gpu(m, HARDWARE["h100-bf16"], PlanSettings(offload=False))
    assert not kept.fits  # 235B in BF16 with 2 gathered banks does not fit 8 x 80 GB
    mem = memory_per_gpu(m, HARDWARE["h100-bf16"], PlanSettings())
    assert mem.fits and 0 < mem.offloaded_layers < 93
    assert memory_per_gpu(m, HARDWARE["h200-fp8"], PlanSettings()).offloaded_layers == 0


def test_saturation_threshold_hand_count():
    m, hw, s = MODELS["qwen3-235b-a22b"], HARDWARE["h100-bf16"], PlanSettings()
    shard = 16 * 3 * 4096 * 1536 * 2  # 128/8 experts of [2I, H] + [H, I], BF16
    t = shard * 7 / (450e9 * 0.8) + 7 * 5e-6  # receive 7 shards at 80% of NVLink, 7 ring steps
    assert gather_s(m, hw, s) == pytest.approx(t)
    th = predict_threshold(m, hw, s)
    assert th.flops_per_layer == pytest.approx(t * 989e12 * 1.2)
    per_token_layer = 2 * (m.dense_params(0) + 8 * 3 * 4096 * 1536) + 2 * 64 * 256 * (2048 + 1) / 2
    assert th.tokens == pytest.approx(th.flops_per_layer / per_token_layer)
    assert th.flops_per_step == pytest.approx(th.tokens * flops_per_request(m, 2048) / 2048)
    assert 0 < th.hide_tokens < th.tokens  # peak FLOP/s in T* makes it conservative by 1/efficiency


def test_one_gpu_has_nothing_to_gather_or_exchange():
    p = plan(MODELS["qwen3-30b-a3b"], HARDWARE["h100-bf16"], PlanSettings(gpus=1))
    assert p.threshold.flops_per_layer == 0 and p.memory.in_flight == 0
    steps = {k: v.step_s for k, v in p.predictions.items()}
    assert steps["AsyncEP"] == pytest.approx(steps["TP"]) == pytest.approx(steps["EP"]) == pytest.approx(steps["PP"])


@pytest.mark.parametrize("hw_name", ["h100-bf16", "h200-fp8"])
def test_paper_figures_qwen3_235b(hw_name):
    """Paper: 1.35-1.37x over the strongest baseline, 29.8-36.2% MFU. A band, not a fit."""
    p = plan(MODELS["qwen3-235b-a22b"], HARDWARE[hw_name], PlanSettings(gpus=8))
    asyncep = p.predictions["AsyncEP"]
    assert 1.1 <= p.speedup <= 1.8
    assert 0.20 <= asyncep.mfu <= 0.45
    assert p.memory.fits and all(v.fits for v in p.predictions.values())
    assert asyncep.tokens_per_s > max(v.tokens_per_s for k, v in p.predictions.items() if k != "AsyncEP")


def test_pcie_link_leaves_the_gather_exposed():
    m, hw = MODELS["qwen3-235b-a22b"], HARDWARE["h200-fp8"]
    nvlink = plan(m, hw).predictions["AsyncEP"]
    pcie = plan(m, hw, PlanSettings(link="pcie")).predictions["AsyncEP"]
    assert pcie.step_s > 2 * nvlink.step_s and pcie.mfu < nvlink.mfu


def test_a_link_on_the_compute_cores_adds_every_gather_to_the_step():
    m = MODELS["qwen3-30b-a3b"]
    hw = cpu_hardware(matmul_flops=5e11, copy_bw=1e10, memory_bytes=24e9, ranks=2)
    beside = PlanSettings(gpus=2, tokens_per_gpu=8192, context=512, link_bw=1.2e9)
    on_cores = dataclasses.replace(beside, link_on_compute=True)
    hidden = plan(m, hw, beside).predictions["AsyncEP"]
    on = plan(m, hw, on_cores).predictions
    added = on["AsyncEP"]
    shard_bytes = 64 * m.expert_params * hw.weight_bytes  # 128 experts, 64 per rank, received by the other
    per_gather = shard_bytes / 1.2e9 + hw.hop_latency_s  # the measured rate, no link efficiency applied
    assert gather_s(m, hw, on_cores) == pytest.approx(per_gather)
    assert "exposed 0%" in hidden.detail  # 8,192 tokens per rank hide it beside compute...
    sharded = len(m.moe_layers) - 1  # the first MoE layer stays whole
    assert added.step_s == pytest.approx(hidden.step_s + sharded * per_gather)  # ...but on the cores all of it adds
    for name in ("TP", "EP", "PP"):  # their collectives were never hidden
        assert on[name].step_s == pytest.approx(plan(m, hw, dataclasses.replace(beside, link_efficiency=1.0)).predictions[name].step_s)


def test_cpu_profile_from_given_numbers():
    hw = cpu_hardware(matmul_flops=5e11, copy_bw=1e10, memory_bytes=24e9, ranks=2)
    assert hw.memory_bytes == 12e9 and hw.nvlink_bw == 1e10
    s = PlanSettings(gpus=2, tokens_per_gpu=4096, context=512, link_bw=0.2e9)
    assert gather_s(MODELS["qwen3-30b-a3b"], hw, s) > 1.0  # 0.6 GB over 0.16 GB/s
    plan(MODELS["qwen3-30b-a3b"], hw, s)


def test_measure_cpu_returns_positive_rates():
    hw = measure_cpu(seconds=0.1)
    assert hw.peak_flops > 0 and hw.nvlink_bw > 0 and hw.memory_bytes > 0


# -- CPU calibration: achieved FLOP/s of a real forward instead of peak x an assumed efficiency -------


def test_calibration_forward_flops_hand_count():
    assert calibration_layers(TOY) == 2  # layer 0 (dense) and layer 1, the first MoE layer
    assert calibration_layers(dataclasses.replace(TOY, moe_layers=(0, 1))) == 1
    # Per request of 4 tokens: 2 * params * 4 for each layer (328 and 528 params, as in the hand count above)
    # + QK^T and PV over 1 + 2 + 3 + 4 causal keys at 2 * heads * (qk + v) = 32 FLOPs per key, in both layers.
    per_request = 2 * 4 * (328 + 528) + 2 * 32 * (1 + 2 + 3 + 4)
    assert forward_flops(TOY, layers=2, requests=3, context=4) == 3 * per_request == 22_464
    assert forward_flops(TOY, layers=1, requests=1, context=4) == 2 * 4 * 328 + 32 * 10


def _timing(flops: float, seconds: float) -> ForwardTiming:
    return ForwardTiming(layers=1, requests=8, context=512, flops=flops, seconds=seconds, backend="eager", threads=1)


def test_calibrated_rate_sets_every_layers_time():
    """achieved FLOP/s = counted FLOPs / measured time; each layer's predicted time is its FLOPs / that rate,
    whatever the matmul peak: the peak only scales MFU and T*."""
    m = MODELS["qwen3-30b-a3b"]
    s = PlanSettings(gpus=1, tokens_per_gpu=4096, context=512)
    counted = sum(f.total for f in _batch_layers(m, s))
    for peak in (5e11, 2e12):
        hw = cpu_hardware(matmul_flops=peak, copy_bw=1e10, memory_bytes=1e12)
        timing = _timing(flops=2e10, seconds=0.125)  # 160 GFLOP/s
        assert timing.achieved_flops == 1.6e11
        assert timing.efficiency(peak) == pytest.approx(1.6e11 / peak)
        asyncep = plan(m, hw, dataclasses.replace(s, efficiency=timing.efficiency(peak))).predictions["AsyncEP"]
        assert asyncep.step_s == pytest.approx(counted / 1.6e11)
        assert asyncep.mfu == pytest.approx(1.6e11 / peak)
        slower = plan(m, hw, dataclasses.replace(s, efficiency=_timing(2e10, 0.25).efficiency(peak))).predictions["AsyncEP"]
        assert slower.step_s == pytest.approx(2 * asyncep.step_s)


def test_calibrated_efficiency_is_capped_at_one():
    assert _timing(flops=1e12, seconds=1.0).efficiency(5e11) == 1.0  # a disturbed peak, not a faster forward


@pytest.mark.parametrize("threads, ranks, expected", [(2, 1, (2, 1.0)), (2, 2, (1, 1.0)), (8, 3, (2, 1.0)), (2, 4, (1, 0.5)), (1, 2, (1, 0.5))])
def test_ranks_split_the_threads(monkeypatch, threads, ranks, expected):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert rank_threads(ranks) == expected


@pytest.mark.parametrize("family, fields, layers", [("qwen3_moe", {}, 1), ("deepseek_v3", {"first_k_dense_replace": 1}, 2)])
def test_time_forward_counts_the_batch_it_runs(family, fields, layers):
    """A real (eager, tiny) forward: the FLOPs it reports are the planner's count for the layers and batch
    it ran; torch's thread count and RNG are left as they were."""
    import torch

    from zp_compile.models import tiny_config

    config = tiny_config(family, layers=3, **fields)
    m = spec_from_config(config)
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    timing = time_forward(config, m, tokens=100, context=32, ranks=2, backend="eager", seconds=0.0)
    assert (timing.layers, timing.requests, timing.context) == (layers, 3, 32)
    assert timing.flops == forward_flops(m, layers, 3, 32)
    assert timing.seconds > 0 and timing.threads == rank_threads(2)[0]
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
    assert config.num_hidden_layers == 3  # the caller's config is not truncated
    with pytest.raises(ValueError, match="backend must be 'inductor' or 'eager', got 'jit'"):
        time_forward(config, m, tokens=32, context=32, backend="jit")


def test_settings_name_bad_numbers():
    with pytest.raises(ValueError, match="gpus must be >= 1, got 0"):
        PlanSettings(gpus=0)
    with pytest.raises(ValueError, match="efficiency must be in"):
        PlanSettings(efficiency=1.5)


# -- model descriptions ---------------------------------------------------------------------------


def _same_shape(spec: ModelSpec, builtin: str) -> bool:
    return dataclasses.replace(spec, name=builtin) == dataclasses.replace(MODELS[builtin], name=builtin)


def test_builtins_match_transformers_configs():
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    assert _same_shape(spec_from_config(MixtralConfig()), "mixtral-8x7b")  # the class defaults are 8x7B's
    assert _same_shape(spec_from_config(DeepseekV3Config()), "deepseek-v3")  # ... and V3's
    qwen = dict(moe_intermediate_size=1536, hidden_size=4096, num_attention_heads=64, num_hidden_layers=94, head_dim=128)
    assert _same_shape(spec_from_config(Qwen3MoeConfig(**qwen)), "qwen3-235b-a22b")
    assert _same_shape(spec_from_config(Qwen3MoeConfig(num_hidden_layers=48, head_dim=128)), "qwen3-30b-a3b")
    totals = {k: round(m.total_params / 1e9, 1) for k, m in MODELS.items()}
    assert totals == {"qwen3-235b-a22b": 235.1, "qwen3-30b-a3b": 30.5, "mixtral-8x7b": 46.7, "deepseek-v3": 671.0}


FAMILY_CASES = [(f, {}) for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe", "glm4_moe", "llama4_text")] + [
    ("qwen3_moe", {"mlp_only_layers": [0], "decoder_sparse_step": 2}),
    ("deepseek_v3", {"first_k_dense_replace": 1}),
    ("glm4_moe", {"first_k_dense_replace": 2}),
    ("llama4_text", {"interleave_moe_layer_step": 2}),
]


@pytest.mark.parametrize("family, fields", FAMILY_CASES, ids=[f"{f}-{'-'.join(map(str, k))}" for f, k in FAMILY_CASES])
def test_config_json_maps_like_the_built_model(tmp_path, family, fields):
    """Read config.json from a directory; compare with the parameters of the model transformers builds."""
    import torch
    from transformers import AutoModelForCausalLM

    from zp_compile.models import tiny_config

    config = tiny_config(family, layers=4, **fields)
    config.save_pretrained(tmp_path)
    spec = load_model(str(tmp_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    experts = {n: p for n, p in params.items() if ".experts." in n}
    moe = sorted({int(n.split("layers.")[1].split(".")[0]) for n in experts})
    assert spec.moe_layers == tuple(moe)
    assert len(moe) * spec.bank_params == sum(p.numel() for p in experts.values())
    total = sum(p.numel() for p in params.values())
    assert spec.total_params == pytest.approx(total, rel=0.005)  # q/k norms, qkv biases, sinks not counted


def test_config_without_moe_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"LlamaConfig \(model_type 'llama'\) has no MoE layer"):
        load_model(str(tmp_path))


def test_qwen_with_every_layer_dense_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 2, "mlp_only_layers": [0, 1]}))
    with pytest.raises(ValueError, match=r"Qwen3MoeConfig .* every one of its 2 layers is dense"):
        load_model(str(tmp_path))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: qwen3-235b-a22b, qwen3-30b-a3b, mixtral-8x7b, deepseek-v3"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="known: a100-bf16, h100-bf16, h100-fp8, h200-bf16, h200-fp8, cpu"):
        hardware("a100-fp8")
    assert load_model("Qwen/Qwen3-235B-A22B") is MODELS["qwen3-235b-a22b"]


# -- CLI ------------------------------------------------------------------------------------------


def _plan_cli(argv: list[str]) -> None:
    """``zp-compile plan ...``; main() may end in sys.exit(0) on success, which is not a failure here."""
    try:
        cli.main(["plan", *argv])
    except SystemExit as e:
        if e.code not in (None, 0):
            raise


def test_cli_plan_prints_every_section(capsys):
    _plan_cli(["--model", "qwen3-235b-a22b", "--hardware", "h200-fp8", "--gpus", "8"])
    out = capsys.readouterr().out
    for text in ("dense weights", "expert shards", "gathered banks in flight", "activations", "KV for the batch",
                 "T* = t_gather", "tokens per GPU", "AsyncEP", "TP ", "EP ", "PP ", "AsyncEP over the best baseline"):
        assert text in out
    assert "at efficiency 0.35 " in out and "calibrated" not in out  # GPU profiles keep the assumed constant


def test_cli_errors_are_one_line(capsys):
    with pytest.raises(SystemExit, match="zp-compile plan: error: unknown hardware 'tpu'; known:"):
        cli.main(["plan", "--model", "mixtral-8x7b", "--hardware", "tpu"])


def _plan_step_ms(out: str, strategy: str) -> float:
    return float(next(line for line in out.splitlines() if line.startswith(f"{strategy} ")).split()[1])


@pytest.fixture
def cpu_cli(monkeypatch, tmp_path):
    """The CLI's cpu path with fixed measurements: a 500 GFLOP/s peak and a forward that ran its counted
    FLOPs at 100 GFLOP/s; returns the checkpoint directory and the calls to time_forward."""
    from zp_compile.costmodel import calibrate, hardware as hw
    from zp_compile.models import tiny_config

    tiny_config("qwen3_moe", layers=2).save_pretrained(tmp_path)
    calls = []
    monkeypatch.setattr(hw, "measure_cpu", lambda ranks: cpu_hardware(5e11, 1e10, memory_bytes=1e12, ranks=ranks))

    def fake_forward(config, m, tokens, context, *, ranks, backend):
        calls.append((tokens, context, ranks, backend))
        flops = forward_flops(m, 1, tokens // context, context)
        return ForwardTiming(1, tokens // context, context, flops, flops / 1e11, backend, 1)

    monkeypatch.setattr(calibrate, "time_forward", fake_forward)
    return tmp_path, calls


def test_cli_cpu_prediction_uses_the_calibrated_rate(cpu_cli, capsys):
    path, calls = cpu_cli
    _plan_cli(["--model", str(path), "--hardware", "cpu", "--gpus", "1", "--tokens", "256", "--context", "64"])
    out = capsys.readouterr().out
    assert calls == [(256, 64, 1, "inductor")]
    assert "= 100.0 GFLOP/s, efficiency 0.200 of the 500 GFLOP/s matmul peak" in out
    m = load_model(str(path))
    counted = sum(f.total for f in _batch_layers(m, PlanSettings(gpus=1, tokens_per_gpu=256, context=64)))
    assert _plan_step_ms(out, "AsyncEP") == pytest.approx(counted / 1e11 * 1e3, abs=0.05)


def test_cli_explicit_efficiency_skips_the_calibration(cpu_cli, capsys):
    path, calls = cpu_cli
    _plan_cli(["--model", str(path), "--hardware", "cpu", "--gpus", "1", "--tokens", "256", "--context", "64", "--efficiency", "0.5"])
    out = capsys.readouterr().out
    assert calls == [] and "calibrated" not in out and "at efficiency 0.5 " in out


def test_cli_cpu_with_a_builtin_name_assumes_the_constant(cpu_cli, capsys):
    _, calls = cpu_cli
    _plan_cli(["--model", "qwen3-30b-a3b", "--hardware", "cpu", "--gpus", "2"])
    out = capsys.readouterr().out
    assert calls == [] and "efficiency 0.35 assumed: a built-in name has no config.json" in out
