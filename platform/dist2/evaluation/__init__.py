from dist2.evaluation.coco_eval import METRIC_KEYS, coco_metrics, evaluate, evaluate_detections, predict

__all__ = ["METRIC_KEYS", "coco_metrics", "evaluate", "evaluate_detections", "predict"]
