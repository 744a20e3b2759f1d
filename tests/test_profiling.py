"""Interval arithmetic behind the overlap fraction."""

from __future__ import annotations

from types import SimpleNamespace as NS

from zp_compile.tools.profiling import intersect, overlap_from_device_events, overlap_from_events, subtract, union


def ev(name, thread, start, end, parent=None):
    return NS(name=name, thread=thread, time_range=NS(start=start, end=end), cpu_parent=parent)


def test_union_and_intersection():
    assert union([(5, 7), (0, 2), (1, 3), (9, 9)]) == [(0, 3), (5, 7)]
    assert intersect([(0, 3), (5, 7)], [(2, 6)]) == [(2, 3), (5, 6)]
    assert intersect([(0, 1)], [(1, 2)]) == []
    assert subtract([(0, 10), (20, 30)], [(2, 3), (5, 25)]) == [(0, 2), (3, 5), (25, 30)]


def test_overlap_fraction():
    region = ev("Torch-Compiled Region: 0/0", 1, 0, 100)
    events = [
        region,
        ev("aten::mm", 1, 5, 10, parent=region),  # fused C++ kernels fill the gaps without events
        ev("_c10d_functional::all_gather_into_tensor", 1, 40, 41, parent=region),
        ev("_c10d_functional::wait_tensor", 1, 60, 80, parent=region),
        ev("gloo:all_gather", 2, 30, 70),  # computing beside it 30-40 and 41-60: 29 of 40 us
    ]
    o = overlap_from_events(events)
    assert (o.gather_us, o.overlapped_us, o.wait_us, o.compute_us) == (40, 29, 20, 79)
    assert o.fraction == 29 / 40


def test_no_gather_means_zero_fraction():
    assert overlap_from_events([ev("aten::mm", 1, 0, 5)]).fraction == 0.0


def kernel(name, start, end, stream=7):
    return NS(name=name, thread=0, time_range=NS(start=start, end=end), cpu_parent=None, device_type="DeviceType.CUDA", stream=stream)


def test_gpu_trace_reads_the_collective_kernels_against_compute_kernels():
    """On a GPU the host thread only launches: the overlap comes from the device timeline, NCCL's kernels
    on their stream against the compute kernels on theirs (the host events are ignored)."""
    events = [
        ev("Torch-Compiled Region: 0/0", 1, 0, 5),  # the host returns at once: launches only
        ev("_c10d_functional::wait_tensor", 1, 4, 5),
        kernel("triton_poi_fused_mul_0", 0, 30),
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 35, 60),
        kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 10, 50, stream=20),
    ]
    o = overlap_from_events(events)
    assert (o.gather_us, o.overlapped_us, o.wait_us, o.compute_us) == (40, 35, 5, 55)
    copies = overlap_from_device_events(events[2:4] + [kernel("Memcpy DtoD (Device -> Device)", 36, 56, stream=20)],
                                        is_transfer=lambda name: name.startswith("Memcpy DtoD"))  # fmt: skip
    assert copies.fraction == 1.0
