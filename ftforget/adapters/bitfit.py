"""BitFit (Ben Zaken et al., 2022): train the bias terms only; no module is added or changed.

Which parameters are "biases" is decided by module identity: the ``bias`` parameter of every Linear,
LayerNorm and convolution (timm's patch embedding) inside the network, the final norm included.
"""

from __future__ import annotations

from torch import nn

#: the layer types whose ``bias`` parameter BitFit trains
BIAS_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.Conv2d)


def bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``bias`` parameter of every Linear, LayerNorm and Conv2d in ``model``, in module order.

    Raises:
        ValueError: ``model`` has no such bias (e.g. a network built with ``qkv_bias=False`` everywhere).
    """
    biases = [
        m.bias for m in model.modules() if isinstance(m, BIAS_LAYERS) and isinstance(m.bias, nn.Parameter)
    ]
    if not biases:
        raise ValueError(f"BitFit: {type(model).__name__} has no Linear, LayerNorm or Conv2d bias to train")
    return biases
