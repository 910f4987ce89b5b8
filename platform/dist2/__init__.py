"""Dist2: distribution-guided knowledge distillation for object detection."""

__version__ = "0.1.0"
