"""Relative entropy coding (MIRACLE), the encoder side.

``encoder`` chooses one candidate index per block, all blocks of a model at once (batched over a
shared candidate matrix); ``compress`` turns a posterior file or a plain checkpoint into a
``.mrc`` with it. What decoding needs -- the integer recipe, the block layout, index payloads
and REC's limits -- lives in :mod:`mlcompress.codecs.rec`, which never imports this package.
"""
