"""Training augmentation of 2D CT slice pairs: the nnU-Net 2D recipe where the anatomy allows it (MONAI transforms).

Probabilities and strengths follow nnU-Net's defaults (Isensee et al. 2021, supplementary: rotation and scaling
p 0.2, noise p 0.1, blur p 0.2, brightness p 0.15, contrast p 0.15, gamma p 0.3) with two changes for axial CT:
rotation within +-15 degrees (slices are upright; nnU-Net rotates 2D data freely) and no mirroring (left and right
parotids are distinct labels). Images are in [-1, 1] with air at -1: the affine pads images with their border value
and labels with background. Items are {"image": (1, S, S), "label": (1, S, S), ...}; other keys pass through.
"""

from __future__ import annotations

import math

from monai import transforms as T

AUGMENTATIONS = ("nnunet2d", "none")  # SegmentationConfig.augment


def nnunet2d() -> T.Compose:
    """The recipe as one MONAI Compose (seed it with `set_random_state`)."""
    return T.Compose(
        [
            T.RandAffined(
                ["image", "label"],
                prob=0.2,
                rotate_range=math.radians(15),
                scale_range=(0.3, 0.3),  # x (1 +- 0.3): nnU-Net's 0.7 to 1.4, symmetric
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            T.RandGaussianNoised("image", std=0.1, prob=0.1),
            T.RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), prob=0.2),
            T.RandScaleIntensityd("image", factors=0.25, prob=0.15),  # brightness x (0.75, 1.25)
            T.RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=0.15),  # contrast
            T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
            T.ToTensord(["image", "label"], track_meta=False),
        ]
    )


def augmentation(name: str) -> T.Compose | None:
    """The Compose named `name` ("none": None)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment {name!r}: expected one of {', '.join(AUGMENTATIONS)}")
    return nnunet2d() if name == "nnunet2d" else None
