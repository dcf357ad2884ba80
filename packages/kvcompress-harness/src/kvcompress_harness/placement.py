"""``--device-map``: a model across several devices with accelerate (``auto``, ``balanced``, ``balanced_low_0``,
``sequential``, or an explicit ``{"module": device}`` map as JSON).

A checkpoint goes through ``from_pretrained(device_map=...)``; a ``random:`` model is made on the meta device,
placed by ``accelerate.infer_auto_device_map``, each parameter created on its own device (random values, never
a full copy anywhere) and dispatched with ``accelerate.dispatch_model``, whose hooks move activations between
devices. The cache then follows the model: each kvcompress layer lives on the device of the keys its attention
layer gives it.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ModelLoadError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_ALLOWED = f"{', '.join(STRATEGIES)}, or a JSON object of module name to device"


def parse_device_map(value: Any) -> str | dict[str, Any] | None:
    """``--device-map`` as accelerate takes it: a strategy name or a ``{module: device}`` dict."""
    if value is None or isinstance(value, dict):
        return _check_map(value) if isinstance(value, dict) else None
    text = str(value).strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"--device-map: got {text!r}, which is not valid JSON ({exc.msg}); allowed: "
                                 f"{_ALLOWED}") from None
        return _check_map(parsed)
    raise ModelLoadError(f"--device-map: got {text!r}; allowed: {_ALLOWED}")


def _check_map(mapping: dict[str, Any]) -> dict[str, Any]:
    for key, dev in mapping.items():
        ok = isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0
        ok = ok or (isinstance(dev, str) and (dev in ("cpu", "meta", "disk") or dev.startswith("cuda")))
        if not isinstance(key, str) or not ok:
            raise ModelLoadError(f"--device-map: module {key!r} -> {dev!r}; allowed: a GPU index, 'cuda:N', "
                                 "'cpu', 'meta' or 'disk'")
    return mapping


def label(device_map: Any) -> str | None:
    """How a device map is named in a result (and in a cell's identity)."""
    if device_map is None:
        return None
    return device_map if isinstance(device_map, str) else json.dumps(device_map, sort_keys=True)


def max_memory(gpus: list[int] | None) -> dict[Any, Any] | None:
    """accelerate's ``max_memory`` limited to ``gpus`` (a torchrun rank's share of a node), or None for all."""
    if gpus is None:
        return None
    import psutil
    import torch

    free = {i: torch.cuda.mem_get_info(i)[0] for i in gpus}
    return {**free, "cpu": psutil.virtual_memory().available}


def _device_for(name: str, device_map: dict[str, Any]) -> Any:
    best, dev = -1, None
    for key, value in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
            best, dev = len(key), value
    if dev is None:
        raise ModelLoadError(f"--device-map: no device for {name!r}; allowed: a map that places every module")
    return dev


def _torch_device(dev: Any) -> Any:
    import torch

    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def _resolve(model: Any, device_map: Any, dtype: Any, memory: dict[Any, Any] | None) -> dict[str, Any]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        return dict(device_map)
    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map in ("auto", "balanced", "balanced_low_0"):
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def build_random_mapped(config: Any, device_map: Any, dtype: Any, seed: int = 0,
                        memory: dict[Any, Any] | None = None) -> Any:
    """A random-init model of ``config`` spread over devices by ``device_map`` and dispatched (eval mode)."""
    import torch
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (RoPE tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied parameters are placed together
    placed = _resolve(model, device_map, dtype, memory)
    if "disk" in placed.values():
        raise ModelLoadError("--device-map: a random: model cannot be offloaded to disk; allowed: GPUs and cpu")
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    torch.manual_seed(seed)
    for name, param in list(model.named_parameters()):
        dev = _torch_device(_device_for(name, placed))
        value = torch.empty(param.shape, dtype=param.dtype, device=dev)
        if dev.type != "meta":
            if name.endswith("bias"):
                value.zero_()
            elif value.ndim == 1:
                value.fill_(1.0)  # norms
            else:
                value.normal_(0.0, std)
        set_module_tensor_to_device(model, name, dev, value=value)
    for name, _ in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, _torch_device(_device_for(name, placed)))
    model.tie_weights()
    gpus = any(isinstance(d, int) or str(d).startswith("cuda") for d in placed.values())
    dispatch_model(model, device_map=placed, **({} if gpus else {"main_device": "cpu"}))
    return model.eval()


def devices(model: Any) -> list[str]:
    """The devices the model's modules run on, in the order of its device map (one for an unmapped model)."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return sorted({str(p.device) for p in model.parameters()})
    out: list[str] = []
    for dev in mapping.values():
        name = str(_torch_device(dev)) if dev != "disk" else "disk"
        if name not in out:
            out.append(name)
    return out


def placement(model: Any) -> dict[str, int] | None:
    """Modules of the device map per device (None for a model on one device)."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return None
    out: dict[str, int] = {}
    for dev in mapping.values():
        name = str(_torch_device(dev)) if dev != "disk" else "disk"
        out[name] = out.get(name, 0) + 1
    return out


def input_device(model: Any) -> Any:
    """Where the model's input ids go: the device its embedding runs on."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    return _torch_device(dev) if dev is not None else emb.weight.device
