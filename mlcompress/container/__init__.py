"""The ``.mrc`` container: one file holding every tensor of a model, each by one codec.

:mod:`~mlcompress.container.writer` encodes and lays out; :mod:`~mlcompress.container.reader`
validates and decodes. The byte layout is :mod:`mlcompress.format` (docs/format.md).
"""

from mlcompress.container.reader import MrcFile, open_mrc
from mlcompress.container.writer import (MrcWriter, Written, encode_entries, encode_tensor, file_size, shared_storage_aliases,
                                         write_encoded, write_mrc, write_stream)
from mlcompress.format.records import Alias, EncodedTensor, TensorRecord

__all__ = ["MrcFile", "MrcWriter", "open_mrc", "write_encoded", "write_mrc", "write_stream", "Written", "encode_entries", "encode_tensor", "file_size",
           "shared_storage_aliases", "Alias", "EncodedTensor", "TensorRecord"]
