"""The ``.mrc`` format itself, with no codec and no I/O: the leaf of the package.

``dtypes`` (the stored dtype names), ``records`` (what the header says about one tensor) and
``header`` (the preamble, the compressed JSON document and its structural validation). The
container (:mod:`mlcompress.container`) reads and writes files with these; codecs validate and
decode one record. Nothing here imports torch at import time.
"""
