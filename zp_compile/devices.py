"""Where a rank's tensors live, and the few device rules the rest of the package must follow.

- ``default_device()``: ``cuda:LOCAL_RANK`` when CUDA works (torchrun's LOCAL_RANK: one GPU per rank
  on a host), else the CPU.
- ``resolve_device(requested)``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` to a device; asking
  for CUDA that does not work is an error that says why (a CUDA build of torch on a machine whose driver
  is too old reports no devices: it must not fall back to the CPU behind the user's back).
- ``synchronize(device)``: wait for the device's queued work. A host clock around GPU work measures
  only the launches; every timing in the package brackets its region with this.
- ``collective_device(group, device)``: the device of a small tensor sent through ``group``'s
  collectives. NCCL moves only CUDA tensors; gloo moves CPU tensors (and a mixed backend such as
  ``cpu:gloo,cuda:nccl`` takes CPU tensors through gloo).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")  # --device; "cuda:N" is accepted as well


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch (see the README)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no usable GPU: no device is "
                "visible (CUDA_VISIBLE_DEVICES) or the NVIDIA driver is older than that CUDA needs")  # fmt: skip
    return None


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA works, else the CPU."""
    if cuda_problem() is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(requested: str | torch.device | None) -> torch.device:
    """The device a rank's model goes to. ``None`` or ``"auto"``: ``default_device()``; ``"cuda"``:
    ``cuda:LOCAL_RANK``; CUDA asked for and not usable: ``ValueError`` naming the reason."""
    if requested is None or requested == "auto":
        return default_device()
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ValueError(f"device {requested!r}: expected one of {', '.join(DEVICES)} or cuda:N ({e})") from None
    if device.type == "cuda":
        if problem := cuda_problem():
            raise ValueError(f"device {str(requested)!r} was asked for, but {problem}")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(requested)!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"device {str(requested)!r}: expected one of {', '.join(DEVICES)} or cuda:N")
    return device


def process_group_backend(device: torch.device) -> str:
    """The collective backend for ranks on ``device``: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    """Block until ``device`` has finished its queued work (nothing to wait for on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: pinned and non-blocking for CUDA
    (a copy from pageable memory would wait for the work queued before it), itself on the CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def collective_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a tensor must be to go through ``group``'s collectives, for a model on ``device``."""
    if group is None:
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    return torch.device("cpu") if "gloo" in backend or "mpi" in backend else device


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (a rank's model lives on one device)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
