"""The check before round 1: the configured network has at most `MAX_PARAMETERS` parameters, builds, and
maps a batch of patches to logits of the patch's shape (one tensor: no deep-supervision lists, no
classifier outputs).

The parameters are counted on PyTorch's meta device (names and shapes only, no memory), so that no
size of `model-args` allocates anything before it is refused. The network is then run on the meta device
(no arithmetic); networks whose construction or forward pass needs real numbers (e.g. SwinUNETR) are
built and run on the CPU instead, once their size is known to fit, in a child process whose address
space is capped at `cpu_check_budget()` bytes (Linux): a patch size whose activations would not fit is
refused in one line instead of exhausting the machine's memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedseg.errors import first_line
from fedseg.limits import MAX_PARAMETERS
from fedseg.models import ModelError, build_model, count_parameters, network_shapes

CHECK_BATCH = 2  # batch norm in training mode needs more than one value per channel
OUT_OF_MEMORY = ("not enough memory", "can't allocate memory")  # torch's CPU allocator, refused by the cap
CPU_CHECK_SHARE = 0.5  # of the machine's physical memory, what a check forward pass on the CPU may use
# a no-grad CPU forward pass of fedseg's networks peaks at 8-11 times its largest activation (measured with
# unet, segresnet, dynunet and basicunet at 96^3: convolution workspaces, skip connections, concatenation)
LIVE_ACTIVATIONS = 12
CGROUP_MEMORY_LIMIT = "/sys/fs/cgroup/memory.max"  # cgroup v2


def check_network(
    name: str, args: Mapping[str, Any], in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> int:
    """The network's parameter count; ModelError saying what does not fit otherwise."""
    shapes = network_shapes(name, in_channels, out_channels, args)
    count = count_parameters(shapes)
    if count > MAX_PARAMETERS:
        raise ModelError(
            f"model '{name}' has {count:,} parameters, more than the {MAX_PARAMETERS:,} fedseg builds: "
            "choose smaller model arguments"
        )
    try:
        with torch.device("meta"):
            _forward_check(shapes, name, in_channels, out_channels, patch_size)
    except ModelError:
        raise  # a wrong output is wrong with real numbers too
    except Exception:  # noqa: BLE001 - e.g. an operation the meta device lacks: check with real numbers
        _check_on_cpu(name, args, in_channels, out_channels, patch_size)
    return count


def _forward_check(
    network: nn.Module, name: str, in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> None:
    """ModelError unless `network` maps a batch of patches (on the current default device) to logits of their shape."""
    output = network.train()(torch.zeros(CHECK_BATCH, in_channels, *patch_size))  # training: deep supervision shows
    expected = (CHECK_BATCH, out_channels, *patch_size)
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            f"model '{name}' returns {type(output).__name__} in training, fedseg needs one tensor of "
            "logits (turn deep supervision or auxiliary outputs off)"
        )
    if tuple(output.shape) != expected:
        raise ModelError(
            f"model '{name}' maps a batch of shape {(CHECK_BATCH, in_channels, *patch_size)} to "
            f"{tuple(output.shape)}, fedseg needs {expected} (a segmentation network whose patch "
            "sides fit its down-sampling, see run-config 'patch-size')"
        )


def _check_on_cpu(
    name: str, args: Mapping[str, Any], in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> None:
    """The forward check with real numbers in a child process capped at `cpu_check_budget()` bytes."""
    budget = cpu_check_budget()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            fault = child.submit(
                _check_in_child, name, dict(args), in_channels, out_channels, tuple(patch_size), budget
            ).result()
    except BrokenProcessPool:
        fault = f"model '{name}': its check forward pass on the CPU died (killed or crashed)"
    if fault:
        raise ModelError(fault)


def cpu_check_budget() -> int:
    """Bytes a check forward pass on the CPU may allocate: `CPU_CHECK_SHARE` of the physical memory, or of
    this process's cgroup memory limit where that is lower (a container, a batch job)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        memory = min(memory, int(Path(CGROUP_MEMORY_LIMIT).read_text().strip()))  # "max": no limit
    return int(CPU_CHECK_SHARE * memory)


def _check_in_child(
    name: str, args: dict[str, Any], in_channels: int, out_channels: int, patch_size: tuple[int, ...], budget: int
) -> str:
    """In a child process: build `name` and run the forward check with at most `budget` more bytes of
    address space; the one-line fault, or "" when the network passes."""
    if sys.platform.startswith("linux"):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _address_space() + budget
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    patch = "x".join(map(str, patch_size))
    try:
        with torch.no_grad():
            network = build_model(name, in_channels, out_channels, args)
            _forward_check(network, name, in_channels, out_channels, patch_size)
    except ModelError as err:
        return str(err)
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in OUT_OF_MEMORY):
            return _fails(name, patch, err)
        return (
            f"model '{name}' needs more than {budget / 2**30:.1f} GiB ({CPU_CHECK_SHARE:.0%} of this machine's "
            f"memory) for a batch of {CHECK_BATCH} patches of {patch} voxels on the CPU: choose a smaller "
            "run-config 'patch-size'"
        )
    except Exception as err:  # noqa: BLE001 - the network's own failure, in one line
        return _fails(name, patch, err)
    return ""


def _fails(name: str, patch: str, err: BaseException) -> str:
    """The network's own failure, in one line."""
    return (
        f"model '{name}' fails on a batch of {CHECK_BATCH} patches of {patch} voxels: "
        f"{type(err).__name__}: {first_line(err)}"
    )


def inference_patch_bytes(
    name: str, args: Mapping[str, Any], in_channels: int, out_channels: int, patch_size: Sequence[int]
) -> int | None:
    """About the memory a no-grad forward pass of one patch takes: `LIVE_ACTIVATIONS` times the network's
    largest activation, found on the meta device (shapes only, however large the patch); None for a
    network the meta device cannot run."""
    network = network_shapes(name, in_channels, out_channels, args).eval()
    sizes: list[int] = []

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in network.modules() if not any(m.children())]
    try:
        with torch.no_grad(), torch.device("meta"):
            network(torch.zeros(1, in_channels, *patch_size))
    except Exception:  # noqa: BLE001 - an operation the meta device lacks
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return LIVE_ACTIVATIONS * max(sizes, default=0)


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux /proc)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
