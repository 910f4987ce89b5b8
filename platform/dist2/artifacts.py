"""The names of the files a run writes, defined once: its epoch checkpoints, its run folder and its MLflow
artifacts all use them (no torch here: the ablation spec and the tracking code name these files too)."""

WEIGHTS = "model.pth"  # the deployed model's state_dict, loadable into the torchvision detector
RESUME = "resume.pth"  # model (with adapters), optimizer, scheduler, scaler, epoch, history
CONFIG = "config.yaml"  # the experiment as it ran (overrides applied)
METRICS = "metrics.json"  # {"history": [per-epoch metrics], "final": {...}, "mlflow_run_id": ...}; written last
BEST = "best"  # the run folder's copy of the checkpoint folder of its best epoch by train.best_metric
CATEGORIES_FILE = "categories.json"  # {label: {"id": category id, "name": name}} beside an exported or MLflow model
