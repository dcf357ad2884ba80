"""Exceptions raised by kvcompress."""

from __future__ import annotations


class KVCompressError(Exception):
    """Base class of kvcompress errors."""


class UnknownPolicyError(KVCompressError, ValueError):
    """A spec names a policy no installed plugin registers."""


class PolicyUnavailableError(KVCompressError, RuntimeError):
    """A policy's plugin is installed but failed to load."""


class RegistrationConflictError(KVCompressError, ValueError):
    """Two plugins registered the same name."""


class AttentionNotAttachedError(KVCompressError, RuntimeError):
    """A compressing cache was used by a model whose attention does not go through kvcompress."""


class ModelRequiredError(KVCompressError, ValueError):
    """A policy needs the model (hidden states, weights found by architecture, RoPE) and got none."""


class CacheReuseError(KVCompressError, ValueError):
    """A cache that already holds a prompt was fed as if it were new."""


class WeightsError(KVCompressError, ValueError):
    """A weights/calibration file is not safetensors, or was made for another model."""
