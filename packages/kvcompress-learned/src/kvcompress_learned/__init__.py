"""kvcompress-learned: a tiny trained MLP scores each token once, as it enters the cache.

``make_cache("learned(budget=256)", model=model)`` uses the weights shipped for the model in use;
``kvcompress-learned train`` trains them for another model.
"""

from __future__ import annotations

from .policy import Learned

__version__ = "0.1.0"

__all__ = ["Learned", "__version__"]
