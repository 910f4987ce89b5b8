"""The detectors (`detectors`) and their backbones (`backbones`).

The detectors are loaded on first use, not with the package: the backbone registry is read when a config is
validated, and that must not cost the seconds of importing torch and torchvision.
"""

__all__ = ["Dist2FCOS", "Dist2RetinaNet", "StagedDetector", "build_detector"]


def __getattr__(name: str):
    if name in __all__:
        from dist2.modeling import detectors

        return getattr(detectors, name)
    raise AttributeError(f"module 'dist2.modeling' has no attribute {name!r}")
