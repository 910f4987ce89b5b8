"""Data: COCO-format datasets, augmentation, and the embedded synthetic default."""

from dist2.data.build import build_datasets, resolve_data_root

__all__ = ["build_datasets", "resolve_data_root"]
