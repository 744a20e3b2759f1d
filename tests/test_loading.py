"""Sharded loading: the right rows, from the checkpoint's own layout, and never another rank's experts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from zp_compile.models.loading import CheckpointError, checkpoint_index, load_sharded
from zp_compile.models.rewrite import SHARD_SUFFIX
from zp_compile.models import VERIFIED_FAMILIES
from zp_compile.sharding import ExpertShard

from dist_utils import fake_world, run_ranks
from workers import loader_peak_memory


@pytest.mark.parametrize("family", VERIFIED_FAMILIES)
def test_each_rank_gets_its_rows_and_reads_nothing_else(checkpoints, family):
    from transformers import AutoModelForCausalLM

    path = checkpoints(family, num_experts=7)
    reference_model = AutoModelForCausalLM.from_pretrained(path)
    reference = reference_model.state_dict()
    world_size = 3
    for rank in range(world_size):
        log: list = []
        with fake_world(world_size, rank):
            model, layers = load_sharded(path, dist.group.WORLD, reader_log=log)
        state = model.state_dict()
        for name, tensor in state.items():
            if name.endswith(SHARD_SUFFIX):
                full = reference[name.removesuffix(SHARD_SUFFIX)]
                plan = ExpertShard(full.shape[0], world_size, rank)
                assert torch.equal(tensor[: plan.num_owned], full[plan.start : plan.stop]), name
                assert not tensor[plan.num_owned :].any(), f"{name}: padding rows must be zero"
            else:
                assert torch.equal(tensor, reference[name]), name
        assert len(layers) == 2 and all(hasattr(layer.module, "_zp_gather") for layer in layers)
        # Buffers stay buffers (e.g. DeepSeek-V3's e_score_correction_bias), parameters parameters.
        assert {n for n, _ in model.named_buffers()} == {n for n, _ in reference_model.named_buffers()}
        plan = ExpertShard(7, world_size, rank)
        for key, rows in log:
            if rows != "all":
                lo, hi = rows
                assert plan.start <= lo and hi <= plan.stop, f"rank {rank} read {key} rows {rows}"


def test_resident_first_layer_loads_whole(checkpoints):
    path = checkpoints("mixtral", num_experts=5, layers=3)
    with fake_world(2, 1):
        model, layers = load_sharded(path, dist.group.WORLD, resident_first_layer=True)
    assert not hasattr(layers[0].module, "_zp_gather") and layers[0].module.gate_up_proj.shape[0] == 5
    assert all(hasattr(layer.module, "_zp_gather") for layer in layers[1:])


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_sharded(tmp_path, None)
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        checkpoint_index(tmp_path)


def test_checkpoint_missing_an_expert_is_named(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = checkpoints("qwen3_moe", num_experts=4)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(src / "model.safetensors")
    dropped = [k for k in tensors if ".experts.3." in k]
    assert dropped, "this family stores one tensor per expert"
    save_file({k: v for k, v in tensors.items() if k not in dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"holds experts \[0, 1, 2\].*has 4"):
        load_sharded(tmp_path, None)


def test_peak_memory_is_a_shard_not_the_bank(checkpoints):
    """4 ranks load a checkpoint with 2 x 100 MB of experts. Each rank's peak resident memory grows by
    its quarter plus a few MB (dense weights, buffers), never by the bank; transformers' own loader (the
    control, showing the measurement can fail) grows by more than the whole bank."""
    path = str(checkpoints("qwen3_moe", layers=2, num_experts=64, hidden=256, expert_size=512, vocab=64))
    full = 2 * 64 * 3 * 256 * 512 * 4
    sharded = run_ranks(4, loader_peak_memory, path, "sharded")
    for r in sharded:
        assert r["expert_bytes"] == full // 4
        assert r["peak_added"] < r["expert_bytes"] + full // 16, (
            f"peak grew by {r['peak_added'] / 1e6:.0f} MB for a {r['expert_bytes'] / 1e6:.0f} MB shard"
        )
    (control,) = run_ranks(1, loader_peak_memory, path, "transformers")
    assert control["peak_added"] > full, control


def test_dtype_conversion_on_load(checkpoints):
    from transformers import AutoModelForCausalLM

    path = checkpoints("gpt_oss", num_experts=5)
    reference = AutoModelForCausalLM.from_pretrained(path).state_dict()
    with fake_world(2, 1):
        model, _ = load_sharded(path, dist.group.WORLD, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        if name.endswith(SHARD_SUFFIX):
            full = reference[name.removesuffix(SHARD_SUFFIX)]
            assert torch.equal(tensor[:2], full[3:5].to(torch.bfloat16)), name
        else:
            assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_tied_embeddings_are_tied_after_loading(checkpoints):
    path = checkpoints("qwen3_moe", tie_word_embeddings=True)
    with fake_world(2, 0):
        model, _ = load_sharded(path, dist.group.WORLD)
    assert model.lm_head.weight is model.model.embed_tokens.weight
