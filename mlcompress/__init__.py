"""mlcompress: compress trained PyTorch models into small ``.mrc`` files and measure the cost.

The library is the product; the ``mlcompress`` command line is a thin layer over it.
"""

__version__ = "0.1.0"
