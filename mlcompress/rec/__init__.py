"""Relative entropy coding (REC): reproducible candidates, block layout, encoder and decoder.

Entry points: :func:`encode_rec` (a checkpoint or posterior file to a ``.mrc``; the library side
of ``mlcompress encode --bits-per-block``) with its :class:`RecOptions`. Decoding goes through
the ``rec`` codec (``mlcompress.codecs.rec``) like every other tensor. Submodules, bottom up:
``counter`` (integer hash), ``sampler`` (candidates), ``layout`` (blocks), ``encoder`` (batched
selection), ``payload`` (index coding), ``decoder``, ``compress`` (whole models).
"""

from __future__ import annotations

from typing import Any

__all__ = ["encode_rec", "RecOptions"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a low-level submodule (e.g. layout, from training code) does not
    # pull in the container and the posterior file machinery.
    if name in __all__:
        from mlcompress.rec import compress

        return getattr(compress, name)
    raise AttributeError(f"module 'mlcompress.rec' has no attribute {name!r}")
