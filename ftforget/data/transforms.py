"""Image statistics and DINO's evaluation transform, shared by the data modules and the probes."""

from __future__ import annotations

from collections.abc import Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision import transforms
from torchvision.transforms import functional as TF

#: the mean/std the DINO backbone was pretrained with (timm's constants)
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]


def crop_transform(resize_size: int, crop_size: int) -> transforms.Compose:
    """The geometric half of DINO's eval transform: bicubic Resize, CenterCrop (PIL in, PIL out)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    return transforms.Compose(
        [transforms.Resize(resize_size, interpolation=bicubic), transforms.CenterCrop(crop_size)]
    )


def to_normalized_tensor(
    image: object, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """The numeric half: uint8 HWC pixels (PIL image or array) to a normalised CHW float tensor."""
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """DINO's k-NN/linear eval transform: Resize (bicubic), CenterCrop, normalise (ImageNet's mean/std
    unless the measured backbone's are given).

    The same steps as :func:`crop_transform` followed by :func:`to_normalized_tensor` (whose functional
    calls are what ``ToTensor`` and ``Normalize`` run), so the pixel cache reproduces it exactly.
    """
    normalize = transforms.Normalize(mean, std)
    return transforms.Compose(
        [*crop_transform(resize_size, crop_size).transforms, transforms.ToTensor(), normalize]
    )
