"""Data: image loading and preprocessing, COCO / Karpathy-split readers, synthetic shapes.

Submodules are imported explicitly (``from showattend.data.images import load_image``) so that
importing this package stays cheap and does not pull in torch.
"""
