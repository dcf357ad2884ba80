"""What a calibration file records about its model, and the check that refuses a file made for another one.

Torch-free: :func:`expected` reads a :class:`kvcompress.ModelInfo` (its config), so the policy module can
import it without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORMAT = "kvcompress-lowrank/1"
# metadata keys that must equal the model's (load_weights names each mismatch)
CHECKED = (
    "format",
    "architecture",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
)


def _rope_theta(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return f"{float(params['rope_theta']):g}"
    theta = getattr(config, "rope_theta", None)
    return f"{float(theta):g}" if theta is not None else "none"


def expected(info: Any) -> dict[str, str]:
    """The metadata a calibration file must carry to be used with the model of ``info`` (a ModelInfo)."""
    config = info.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "format": FORMAT,
        "architecture": str(info.architecture),
        "num_layers": str(info.num_layers),
        "num_heads": str(info.num_heads),
        "num_kv_heads": str(info.num_kv_heads),
        "head_dim": str(info.head_dim),
        "hidden_size": str(info.hidden_size),
        "intermediate_size": str(getattr(text, "intermediate_size", None)),
        "vocab_size": str(getattr(text, "vocab_size", None)),
        "rope_theta": _rope_theta(text),
    }


def model_metadata(model: Any) -> dict[str, str]:
    """Everything :func:`expected` checks, plus the model's name and, for people reading the file, the norm of
    its first key projection (a policy's setup sees the model's config, not its weights: a model of the same
    configuration with other weights is not told apart)."""
    import kvcompress

    info = kvcompress.ModelInfo.from_model(model)
    meta = expected(info)
    meta["model"] = Path(
        str(info.name or "")
    ).name  # the checkpoint's name, not where it sits on this machine
    for name, param in model.named_parameters():
        if "k_proj" in name or "c_attn" in name:
            meta["fingerprint"] = f"{name}: norm {float(param.detach().float().norm()):.6g}"
            break
    return meta
