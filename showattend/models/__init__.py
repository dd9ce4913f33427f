"""Encoder, attention, decoder and the full captioner."""
