"""How far a compressed model drifts from its reference (``mlcompress diverge``).

Public API:

* :func:`diverge` with :class:`DivergeOptions` -- the whole comparison (language models on data,
  sampled or enumerated sequences, classifiers of a task, reference caches); returns a
  :class:`DivergeReport` whose ``report`` is what ``--json`` prints.
* :func:`token_measures` -- KL, reverse KL, JS, total variation, same-top and log-likelihoods
  between two ``[positions, vocab]`` logit tensors, chunked over the vocabulary.

Modules: ``measures`` (per-position divergences), ``stats`` (statistics of our measures),
``data`` (documents, the token stream, windows), ``models`` (loading both sides), ``lm`` (the
data loop), ``llamacpp`` (llama.cpp's scoring rule and quantized-base KL), ``llamacpp_stats``
(its statistics, its way), ``kld_file`` (its ``.kld`` base files), ``sequence`` (sample/exact
modes), ``cache`` (top-k reference caches), ``classifier`` (flips), ``report`` (JSON, gates,
table), ``plot``; see docs/diverge.md.
"""

from mlcompress.divergence.compare import DivergeOptions, DivergeReport, diverge
from mlcompress.divergence.measures import TokenMeasures, token_measures

__all__ = ["DivergeOptions", "DivergeReport", "TokenMeasures", "diverge", "token_measures"]
