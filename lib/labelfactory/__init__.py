"""labelfactory: a labelling factory for CT segmentation (DatasetGAN + ClamNet) behind MONAI Label."""

from labelfactory.errors import LabelFactoryError

__version__ = "0.1.0"
__all__ = ["LabelFactoryError", "__version__"]
