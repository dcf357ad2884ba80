"""Hook specifications of the ``kvcompress`` plugin system.

A plugin is a module named by an entry point in the ``kvcompress`` group. It
implements any of the hooks below with :data:`kvcompress.hookimpl`; each hook
receives a ``register`` callable, in the style of ``llm``'s ``register_models``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("kvcompress")
hookimpl = pluggy.HookimplMarker("kvcompress")

Register = Callable[..., None]


@hookspec
def register_policies(register: Register) -> None:
    """Register KV-cache policies.

    Called once, when the registry is first built (on the first
    :func:`kvcompress.make_cache`, :func:`kvcompress.list_policies` or
    ``kvcompress list``).

    :param register: call ``register(policy_cls)`` once per policy. ``policy_cls``
        is a dataclass subclass of :class:`kvcompress.SelectionPolicy` or
        :class:`kvcompress.Representation` with a class attribute ``name``; its
        docstring's first line is the description. ``register(cls, name=...)``
        overrides the name.
    :return: nothing; a name registered twice raises an error naming both
        distributions.
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics that tasks can report.

    Called once, when the registry is first built.

    :param register: call ``register(obj, name=None, description=None)``; the
        name defaults to ``obj.name`` or ``obj.__name__``.
    :return: nothing.
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register benchmark tasks the harness can run.

    Called once, when the registry is first built.

    :param register: call ``register(task, name=None, description=None)``; the
        task object's protocol is defined by ``kvcompress-harness``.
    :return: nothing.
    """
