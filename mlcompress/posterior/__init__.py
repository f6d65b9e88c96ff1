"""Posteriors over weights for MIRACLE/REC: Lambert W, the Mean-KL map, the posterior file."""
