"""Where a rank's model and tensors go: the device rules of ``zp_compile.devices`` and the places that
must follow them (loading, the threshold's timing and all-reduce, the shared-memory transport, serve)."""

from __future__ import annotations

import pytest
import torch

from zp_compile import devices


@pytest.fixture
def broken_cuda(monkeypatch):
    """A CUDA build of torch on a machine where CUDA does not work (an old driver, no visible GPU)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_and_auto_without_cuda(broken_cuda):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    assert devices.process_group_backend(torch.device("cpu")) == "gloo"
    assert devices.process_group_backend(torch.device("cuda", 3)) == "nccl"


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_cuda_asked_for_and_broken_is_an_error(broken_cuda, requested):
    with pytest.raises(ValueError, match=r"built for CUDA 13\.0 but finds no usable GPU.*driver"):
        devices.resolve_device(requested)


def test_cuda_on_a_cpu_build_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="CPU-only build"):
        devices.resolve_device("cuda")


@pytest.mark.parametrize("requested", ["tpu", "gpu0", "mps"])
def test_unknown_devices_are_refused(requested):
    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda"):
        devices.resolve_device(requested)


@pytest.mark.parametrize(("backend", "expected"), [("nccl", "cuda"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_collective_tensors_go_where_the_backend_moves_them(monkeypatch, backend, expected):
    monkeypatch.setattr(devices.dist, "get_backend", lambda group: backend)
    assert devices.collective_device(object(), torch.device("cuda", 1)).type == expected
    assert devices.collective_device(None, torch.device("cuda", 1)) == torch.device("cpu")


def test_peak_matmul_is_timed_on_the_model_device_and_synchronised(monkeypatch):
    """On an accelerator the matmul runs there, big enough to measure the peak, with the device
    synchronised around the clock (meta stands in for the accelerator: no compute, no clock)."""
    from zp_compile.costmodel.hardware import matmul_size, measure_matmul_flops

    synced = []
    monkeypatch.setattr(devices, "synchronize", lambda device: synced.append(torch.device(device)))
    assert measure_matmul_flops(torch.float32, seconds=0.01, device="meta") > 0
    assert synced and set(synced) == {torch.device("meta")}
    assert matmul_size("meta") == 8192 and matmul_size("cpu") == 1024


def test_shared_memory_transport_refuses_a_model_off_the_cpu():
    from transformers import AutoModelForCausalLM

    import zp_compile
    from zp_compile.models import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    with pytest.raises(ValueError, match="transport='shm'.*host shared memory.*meta"):
        zp_compile.optimize(model, transport="shm", backend="eager")


def test_from_pretrained_takes_a_device(checkpoints, broken_cuda):
    import zp_compile

    path = checkpoints("qwen3_moe", layers=2, num_experts=4)
    model = zp_compile.from_pretrained(path, device="cpu", backend="eager")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="no usable GPU"):
        zp_compile.from_pretrained(path, device="cuda", backend="eager")


def test_serve_refuses_cuda_that_does_not_work(checkpoints, broken_cuda, capsys):
    """Before any rank starts, with the reason, instead of serving from the CPU behind the user's back."""
    from zp_compile.cli import main

    path = checkpoints("qwen3_moe", layers=2, num_experts=4)
    with pytest.raises(SystemExit, match=r"zp-compile serve: error: device 'cuda' was asked for, but .*no usable GPU"):
        main(["serve", "--model", str(path), "--device", "cuda", "--labels", " a"])
