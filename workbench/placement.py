"""Models larger than one GPU: spreading a model's layers over devices.

Hugging Face models are placed by accelerate's device maps (``"auto"``, ``"balanced"``,
``"sequential"`` or an explicit ``{module name: device}``), with optional ``max_memory``;
TransformerLens models split their blocks evenly over the first ``n`` GPUs (TransformerLens's
``n_devices``), with the embedding on the first and the unembedding on the last. Each layer's
attention then runs on its own device: :func:`kernels.attention` launches on the device of its
tensors, so the statistics are the same as on one device.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

#: Placement strategies accelerate understands by name.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | int | dict[str, str | int]


def check_device_map(device_map: DeviceMap) -> None:
    """Refuse a device map that is not one of :data:`STRATEGIES`, a GPU count >= 1 or a dict."""
    if isinstance(device_map, bool):
        raise WorkbenchError(f"device_map must be {', '.join(STRATEGIES)}, a GPU count or a dict, got {device_map!r}")
    if isinstance(device_map, int):
        if device_map < 1:
            raise WorkbenchError(f"device_map as a GPU count must be >= 1, got {device_map}")
        return
    if isinstance(device_map, dict):
        return
    if device_map not in STRATEGIES:
        raise WorkbenchError(
            f"unknown device_map {device_map!r}: use {', '.join(STRATEGIES)}, a GPU count, or a "
            "dict of module name -> device"
        )


def gpu_count(device_map: DeviceMap) -> int:
    """GPUs a strategy or count spreads over: every visible one for a strategy (1 on a machine
    without CUDA, which then places everything on the CPU)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, int):
        if device_map > max(visible, 1):
            raise WorkbenchError(f"device_map={device_map} GPUs asked for, but this machine has {visible}")
        return device_map
    return max(visible, 1)


def block_devices(n_layers: int, n_devices: int, first: torch.device) -> list[torch.device]:
    """The device of each of ``n_layers`` blocks spread evenly over ``n_devices`` devices counted
    from ``first`` (TransformerLens's rule: block ``i`` on ``first + i * n_devices // n_layers``)."""
    if first.type == "cpu":
        return [first] * n_layers
    start = first.index or 0
    return [torch.device(first.type, start + i * n_devices // n_layers) for i in range(n_layers)]


def place_transformer_lens(model, device_map: DeviceMap):
    """Spread a ``HookedTransformer``'s blocks over the GPUs (dict maps are for Hugging Face
    models); returns the model."""
    if isinstance(device_map, dict):
        raise WorkbenchError(
            "TransformerLens models spread their blocks evenly: give device_map='auto' or a GPU count, not a dict"
        )
    n = gpu_count(device_map)
    first = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    devices = block_devices(model.cfg.n_layers, n, first)
    model.cfg.n_devices = n if first.type == "cuda" else 1
    model.cfg.device = str(first)
    model.embed.to(devices[0])
    model.hook_embed.to(devices[0])
    if hasattr(model, "pos_embed"):
        model.pos_embed.to(devices[0])
    for block, device in zip(model.blocks, devices):
        block.to(device)
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(devices[-1])
    return model


def place_hugging_face(model, device_map: DeviceMap, max_memory: dict | None = None):
    """Dispatch a Hugging Face model built on the CPU over devices with accelerate; returns it."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        plan = device_map
    else:
        n = gpu_count(device_map)
        if max_memory is None and torch.cuda.is_available():
            max_memory = {i: torch.cuda.get_device_properties(i).total_memory for i in range(n)}
        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map != "sequential" and torch.cuda.is_available():
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        plan = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    try:
        return dispatch_model(model, device_map=plan)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise WorkbenchError(f"cannot place the model with device_map={device_map!r}: {exc}") from exc


def devices_of(model: torch.nn.Module) -> list[str]:
    """The devices holding the model's parameters, in first-use order."""
    seen: dict[str, None] = {}
    for p in model.parameters():
        seen.setdefault(str(p.device), None)
    return list(seen)
