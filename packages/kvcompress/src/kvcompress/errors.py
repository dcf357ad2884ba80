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
