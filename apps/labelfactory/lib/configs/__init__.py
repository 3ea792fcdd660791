"""Task configs: one module per model family, each a MONAI Label `TaskConfig`."""
