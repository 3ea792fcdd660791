"""ClamNet: a UNet++ pair trained contrastively from image-level labels (normal / abnormal) to map a marker per
pixel; targets in loss.py."""
