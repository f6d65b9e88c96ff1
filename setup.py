"""Build of the optional C extension; everything else about the package is in pyproject.toml.

``mlcompress.codecs._lossless3`` holds the hot loops of the ``lossless3`` codec and a fast CRC-32
(docs/lossless.md). It is optional: where no C compiler is available the install still
succeeds, ``lossless3`` files still decode (slowly, with numpy) and new files are written with
``lossless2``. ``-O3`` but no ``-march``: a built wheel must run on any x86-64 (the CRC's
carry-less multiplication is chosen at run time).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mlcompress.codecs._lossless3",
            sources=["mlcompress/codecs/_lossless3.c"],
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
