from dist2.modeling.detectors import Dist2FCOS, Dist2RetinaNet, StagedDetector, build_detector

__all__ = ["Dist2FCOS", "Dist2RetinaNet", "StagedDetector", "build_detector"]
