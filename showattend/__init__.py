"""showattend: Show, Attend and Tell captioning with soft and hard attention.

Public API (imported lazily so ``import showattend`` does no work)::

    import showattend
    cap = showattend.load("runs/demo/best.pt")   # or a shipped model: showattend.load("flickr8k")
    for c in cap.caption(["photo.jpg"], beam=3):
        print(c.caption, c.attention.shape)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "available_models", "CaptionerAPI", "Caption", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load", "CaptionerAPI", "Caption"):
        from showattend import api

        return getattr(api, name)
    if name == "available_models":  # the names load() accepts besides checkpoint paths
        from showattend import registry

        return registry.available_models
    raise AttributeError(f"module 'showattend' has no attribute {name!r}")
