"""Heavy third-party modules imported on first use, so that light commands start fast.

Why: ``import torch`` costs 2-3 s and ``import numpy`` ~0.2 s, while ``mlcompress --help``,
``inspect`` and the error for a missing file need neither. The modules that sit on those paths
(the format, the codec registry, the container reader) bind ``torch``/``numpy`` to a
:class:`LazyModule` at module level instead of importing them; the first attribute access
imports the real module, and every attribute is cached on the proxy, so later accesses cost a
plain attribute lookup. Modules that need torch at import time (``nn.Module`` subclasses) import
it normally: they are never on a light path.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A stand-in for the module ``name`` that imports it on first attribute access."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name
        self.__dict__["_module"] = None

    def _load(self) -> ModuleType:
        module = self.__dict__["_module"]
        if module is None:
            module = importlib.import_module(self.__dict__["_name"])
            self.__dict__["_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._load(), attr)
        self.__dict__[attr] = value  # later lookups never reach __getattr__
        return value

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_module"] is not None else "not loaded"
        return f"<lazy module {self.__dict__['_name']!r} ({state})>"


torch: Any = LazyModule("torch")
numpy: Any = LazyModule("numpy")
#: The entropy coder: only encoding and decoding payloads need it, never ``inspect``.
constriction: Any = LazyModule("constriction")
#: zstd, the lossless2 codec's entropy stage: only its payloads need it.
zstandard: Any = LazyModule("zstandard")
