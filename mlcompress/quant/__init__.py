"""Post-training quantization: data-free uniform integer quantization and L².

* :mod:`mlcompress.codecs.quant.uniform` -- the lecture's Q(x) = clip(round(x/s) + b), Q~(n) = s(n - b),
  per tensor, per channel or per group, symmetric or asymmetric, 1..16 bits.
* :mod:`mlcompress.codecs.quant.l2` -- the L² edge/step dead-zone transform with straight-through rounding.
* :mod:`mlcompress.quant.counter` -- the differentiable counter and its entropy (rate) estimate.
* :mod:`mlcompress.quant.calibrate` -- the L² optimisation loop (distillation, rate penalty, target ratio).
* :mod:`mlcompress.quant.model` -- which tensors of a model are quantized, and writing the ``.mrc``.
"""
