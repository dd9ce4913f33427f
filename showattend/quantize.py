"""Dynamic int8 quantization of the decoder for CPU serving.

The decoder's Linear layers and its LSTM cell keep int8 weights and quantize their inputs on the
fly (per-tensor affine, PyTorch's dynamic quantization); the CNN encoder and the word embedding
stay fp32. Nothing is calibrated and nothing is stored: a checkpoint stays fp32 and is quantized
when loaded for decoding (``showattend.load(..., int8=True)``, ``caption --int8``,
``evaluate --int8``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from showattend.models.captioner import Captioner


class QuantizationError(ValueError):
    """The model cannot be quantized here (device, backend)."""


def quantize_decoder(model: Captioner) -> Captioner:
    """Replace the decoder's Linear and LSTMCell layers by dynamic int8 ones, in place (CPU only).

    Returns ``model`` for chaining. The attention maps, β and word choices then come from int8
    matmuls: captions may differ from the fp32 model's in a few words (measured in bench/).
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise QuantizationError("int8 decoding runs on the CPU only (use --device cpu)")
    if not torch.backends.quantized.supported_engines or \
            torch.backends.quantized.engine == "none":
        raise QuantizationError("this PyTorch build has no quantized CPU backend")
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; the eager dynamic API still
        # works in the pinned torch, and torchao would be a second heavy dependency for one call.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        model.decoder = quantize_dynamic(model.decoder.eval(), {nn.Linear, nn.LSTMCell},
                                         dtype=torch.qint8)
    return model
