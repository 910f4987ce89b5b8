from dist2.evaluation.coco_eval import coco_metrics, evaluate, evaluate_detections, predict

__all__ = ["coco_metrics", "evaluate", "evaluate_detections", "predict"]
