"""Data: NIfTI I/O, nnU-Net v2 raw datasets, preprocessing, splits, patch sampling and augmentation."""
