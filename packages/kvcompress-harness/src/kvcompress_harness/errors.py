"""Errors the harness shows a person as one clear line."""

from __future__ import annotations


class HarnessError(Exception):
    """A user-facing error: bad input, missing data or model, unsupported model."""


class ModelLoadError(HarnessError):
    """The model or tokenizer could not be loaded."""


class DataError(HarnessError):
    """A data file or data set could not be read."""


class UnknownNameError(HarnessError, ValueError):
    """A policy, task or parameter name that nothing registers."""
