"""Model files delivered with showattend (see showattend/registry.py)."""
