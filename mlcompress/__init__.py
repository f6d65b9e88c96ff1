"""mlcompress: compress trained PyTorch models into small ``.mrc`` files and measure the cost.

The library is the product; the ``mlcompress`` command line is a thin layer over it::

    import mlcompress
    report = mlcompress.encode("model.pt", method=mlcompress.Rec(bits_per_block=16))
    weights = mlcompress.decode(report.path)

Importing the package is cheap (no torch, no numpy until a call needs them).
"""

from mlcompress.version import __version__

from mlcompress.api import (  # noqa: E402
    Float,
    L2,
    Lossless,
    Progress,
    Prune,
    Quant,
    Rec,
    Report,
    Update,
    decode,
    decode_bytes,
    decode_file,
    diverge,
    encode,
    encode_bytes,
    evaluate,
    fit_posterior,
    inspect,
    train,
)

__all__ = ["__version__", "encode", "encode_bytes", "decode", "decode_bytes", "decode_file", "inspect",
           "fit_posterior", "train", "evaluate", "diverge", "Report", "Update", "Progress", "Rec", "Lossless",
           "Quant", "L2", "Float", "Prune"]
