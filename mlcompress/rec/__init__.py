"""Relative entropy coding (REC): reproducible candidates, block layout, encoder and decoder."""
