"""The `dist2` command line. Every subcommand maps to one function; user mistakes exit 2 with one message."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from dist2.errors import UserError

log = logging.getLogger("dist2")


def _add_config_args(p: argparse.ArgumentParser, what: str = "experiment YAML file (see experiments/)") -> None:
    p.add_argument("config", type=Path, help=what)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=2 (repeatable)")


def _write_json(metrics: dict, path: Path | None) -> None:
    # NaN (a COCO metric with no ground truth in its range) is written as null: JSON has no NaN.
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    print(json.dumps(clean, indent=1))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean, indent=1) + "\n")


def _run_overrides(args) -> list[str]:
    extra = [] if args.num_workers is None else [f"ray.num_workers={args.num_workers}"]
    extra += [] if args.gpu is None else [f"ray.use_gpu={str(args.gpu).lower()}"]
    return args.overrides + extra


def cmd_run(args) -> int:
    from dist2.artifacts import WEIGHTS
    from dist2.config import load_config
    from dist2.methods import TEACHER_HEAD_METRICS

    cfg = load_config(args.config, _run_overrides(args))  # a mistake in it is reported before torch loads
    from dist2.engine.launch import launch

    metrics = launch(cfg, args.command, args.config, address=args.address, tracking_uri=args.tracking_uri,
                     experiment=args.experiment)
    extra = "".join(f", {k} {metrics[k]:.2f}" for k in TEACHER_HEAD_METRICS if k in metrics)
    log.info("finished %s: mAP %.2f%s; weights in %s", cfg.name, metrics.get("mAP", float("nan")), extra,
             cfg.run_dir / WEIGHTS)
    return 0


def cmd_predict(args) -> int:
    from dist2.config import load_config

    cfg = load_config(args.config, args.overrides)
    from dist2.predict import RESULTS, predict

    out = predict(cfg, args.checkpoint, args.images, args.out,
                  args.score_thresh, args.teacher_head)
    log.info("wrote the pictures and %s to %s", RESULTS, out)
    return 0


def cmd_export(args) -> int:
    from dist2.config import load_config

    cfg = load_config(args.config, args.overrides)
    from dist2.export import export

    out = export(cfg, args.checkpoint, args.out)
    log.info("wrote %s (TorchScript: a list of CHW images in [0, 1] -> their detections)", out)
    return 0


def cmd_eval(args) -> int:
    from dist2.evaluation.files import evaluate_checkpoint, evaluate_files
    from dist2.methods import DEFAULT_EVAL_BACKEND

    if args.config is not None:
        if args.checkpoint is None or args.predictions is not None:
            raise UserError("dist2 eval CONFIG needs --checkpoint PATH (and no --predictions)")
        from dist2.config import load_config

        backend = [f"eval.backend={args.backend}"] if args.backend else []
        cfg = load_config(args.config, args.overrides + backend)
        if args.teacher_head:
            from dist2.distill.teacher_head import evaluate_with_teacher_head

            metrics = evaluate_with_teacher_head(cfg, args.checkpoint)
        else:
            metrics = evaluate_checkpoint(cfg, args.checkpoint)
    else:
        if args.annotations is None or args.predictions is None:
            raise UserError("dist2 eval needs either CONFIG --checkpoint PATH, "
                            "or --annotations A.json --predictions P.json")
        metrics = evaluate_files(args.annotations, args.predictions, args.backend or DEFAULT_EVAL_BACKEND)
    _write_json(metrics, args.json)
    return 0


def cmd_data_synth(args) -> int:
    from dist2.config import SynthConfig, validate
    from dist2.data.synth import generate

    cfg = validate(SynthConfig, {"num_train": args.num_train, "num_val": args.num_val,
                                 "image_size": args.image_size, "seed": args.seed,
                                 "difficulty": args.difficulty}, "dist2 data synth")
    out = generate(args.out, cfg)
    print(f"wrote {cfg.num_train} train and {cfg.num_val} val images to {out}")
    return 0


def cmd_bench(args) -> int:
    if args.coco_eval:
        from dist2.bench_eval import bench_coco_eval

        bench_coco_eval(args.images)
        return 0
    if args.gpu_smoke:
        from dist2.bench_gpu import gpu_smoke

        gpu_smoke()
        return 0
    if args.data is not None:
        from dist2.bench_data import bench_data

        bench_data(args.data, batch_size=args.batch_size)
        return 0
    if args.cluster_join is not None:
        from dist2.bench_cluster import bench_cluster_join

        bench_cluster_join(args.cluster_join)
        return 0
    if args.ray is not None:
        from dist2.bench_ray import bench_ray

        bench_ray(args.ray, epochs=args.epochs)
        return 0
    if args.distill is not None and args.paper_scale:
        from dist2.bench_distill import bench_distill_memory

        bench_distill_memory(args.distill)
        return 0
    if args.distill is not None:
        from dist2.bench_distill import bench_distill

        bench_distill(args.distill, steps=args.steps, batch_size=args.batch_size)
        return 0
    from dist2.bench import bench_train

    bench_train(args.configs, steps=args.steps, batch_size=args.batch_size, paper_scale=args.paper_scale)
    return 0


def cmd_ablate(args) -> int:
    from dist2.ablation.spec import load_ablation

    spec = load_ablation(args.config, args.overrides)  # a mistake in the file is reported before torch and Ray load
    from dist2.ablation.runner import ablate

    return ablate(args.config, spec, args.overrides, resume=args.resume, address=args.address,
                  tracking_uri=args.tracking_uri, wait_timeout=args.wait_timeout)


def cmd_report(args) -> int:
    """From an ablation file: its experiment, store, tables and report folder, as `dist2 ablate` would write
    them. Without one: --experiment and --out, all tables, the store at --tracking-uri or ./runs/mlflow.db."""
    from dist2.ablation.spec import TABLES, load_ablation

    if (args.ablation is None) == (not args.experiment):
        raise UserError("dist2 report needs an ABLATION file or --experiment NAME (not both)")
    if args.ablation is not None:
        spec = load_ablation(args.ablation, args.overrides)
        experiments, output_dir, tables = [spec.name], spec.output_dir, spec.tables
        out = args.out or output_dir / spec.name / "report"
    else:
        if args.overrides:
            raise UserError("dist2 report: --set overrides an ABLATION file's keys; none was given")
        if args.out is None:
            raise UserError("dist2 report --experiment NAME needs --out DIR")
        experiments, output_dir, tables, out = args.experiment, Path("runs").absolute(), list(TABLES), args.out
    store = output_dir / "mlflow.db"
    if args.tracking_uri is None and not store.is_file() and "MLFLOW_TRACKING_URI" not in os.environ:
        raise UserError(f"no MLflow store at {store} (the default); pass --tracking-uri")
    from dist2.report import write_report  # pandas and MLflow: only once the arguments are known to be good
    from dist2.tracking import resolve_tracking_uri

    path = write_report(resolve_tracking_uri(args.tracking_uri, output_dir), experiments, out, tables)
    print(f"report: {path}")
    return 0


def _checkpoint_arguments(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """CONFIG [--set KEY=VALUE ...] --checkpoint PATH: what every command on a trained checkpoint takes."""
    p.add_argument("config", type=Path, help="experiment YAML the checkpoint was trained with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", type=Path, required=True, help=checkpoint_help)


def build_parser() -> argparse.ArgumentParser:
    from dist2.config import SynthConfig
    from dist2.methods import DEFAULT_EVAL_BACKEND, EVAL_BACKENDS

    parser = argparse.ArgumentParser(prog="dist2", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (("train", "train a detector from an experiment YAML"),
                            ("distill", "train a student with a frozen teacher (DI, FI, Dist2, baselines)")):
        p = sub.add_parser(name, help=help_text, description=f"{help_text}. A run whose name has checkpoints "
                           "continues from the latest one.")
        _add_config_args(p)
        p.add_argument("--num-workers", type=int, help="data-parallel Ray Train workers (ray.num_workers)")
        p.add_argument("--gpu", action=argparse.BooleanOptionalAction, help="workers on GPUs (ray.use_gpu)")
        p.add_argument("--address", help="a Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                       "sqlite:///<output_dir>/mlflow.db)")
        p.add_argument("--experiment", default="dist2", help="MLflow experiment name (default: dist2)")
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("ablate", help="run an ablation grid (ablations/*.yaml) as Ray Tune trials, then report",
                       description="Run an ablation grid as Ray Tune trials (teachers first, each trained once), "
                       "log every run to MLflow, and write the report.")
    _add_config_args(p, "ablation YAML file (see ablations/); --set overrides its keys")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ablation (Tuner.restore)")
    p.add_argument("--address", help="a Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///<output_dir>/mlflow.db)")
    p.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="end the job (exit 3, resumable) after waiting this long with no trial running for lack "
                   "of resources (default: wait as long as it takes)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="results.md in the paper's layout from an MLflow experiment's runs")
    p.add_argument("ablation", type=Path, nargs="?",
                   help="an ablation YAML: report its experiment, from its store, with its tables:")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the ablation file's keys, as given to dist2 ablate (e.g. output_dir)")
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="instead of ABLATION: any MLflow experiment, every table; given again, one report over "
                   "several (a grid and a later grid that added rows to it; their shared teacher counts once)")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db "
                   "(the ablation's output_dir, else ./runs)")
    p.add_argument("--out", type=Path, help="folder for results.md and the plots (default with ABLATION: "
                   "<output_dir>/<name>/report, where dist2 ablate writes it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="draw a checkpoint's detections on images, and write them as COCO results")
    _checkpoint_arguments(p, "model.pth (or resume.pth)")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files and/or folders of images")
    p.add_argument("--out", type=Path, required=True, help="folder for one PNG per image and predictions.json")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections at or above this score "
                   "(predictions.json keeps all; default 0.5)")
    p.add_argument("--teacher-head", action="store_true", help="draw the teacher's head on the student's neck (a "
                   "distillation config: the run's trained N2N adapter from resume.pth, else the probe)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a checkpoint's detector as a TorchScript file")
    _checkpoint_arguments(p, "model.pth (or resume.pth) to export")
    p.add_argument("--out", type=Path, required=True, help="the TorchScript file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="COCO box mAP of a checkpoint, or of a COCO results file")
    p.add_argument("config", type=Path, nargs="?", help="experiment YAML the checkpoint was trained with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", type=Path, help="model.pth (or resume.pth) to evaluate")
    p.add_argument("--annotations", type=Path, help="COCO instances JSON (ground truth)")
    p.add_argument("--predictions", type=Path, help="COCO detection results JSON")
    p.add_argument("--json", type=Path, help="also write the metrics to this file")
    p.add_argument("--backend", choices=EVAL_BACKENDS, help=f"the COCOeval implementation (default: the config's "
                   f"eval.backend, else {DEFAULT_EVAL_BACKEND}; pycocotools is the reference)")
    p.add_argument("--teacher-head", action="store_true",
                   help="also the teacher's head on the student's neck (a distillation CONFIG): teacher_head_probe_mAP "
                   "(least-squares probe), and teacher_head_mAP (the run's trained N2N adapter) where it has one")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write the synthetic COCO-format dataset")
    s.add_argument("--out", type=Path, required=True)
    defaults = SynthConfig()
    s.add_argument("--num-train", type=int, default=defaults.num_train)
    s.add_argument("--num-val", type=int, default=defaults.num_val)
    s.add_argument("--image-size", type=int, default=defaults.image_size, help="width in pixels")
    s.add_argument("--seed", type=int, default=defaults.seed)
    s.add_argument("--difficulty", default=defaults.difficulty, help="easy, standard or hard (default: hard)")
    s.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("bench", help="training throughput (images/s) of experiment configs")
    p.add_argument("configs", type=Path, nargs="*", help="experiment YAMLs (default: the quick and paper ones)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None, help="override the configs' batch size")
    p.add_argument("--paper-scale", action="store_true", help="include the paper-scale models (batch 2); with "
                   "--distill: peak memory of each method's step at 800x1333, batch 2")
    p.add_argument("--distill", type=Path, metavar="CONFIG",
                   help="instead: time the parts of a distillation step for this distillation config")
    p.add_argument("--ray", type=Path, metavar="CONFIG",
                   help="instead: time this run in-process, on Ray Train local mode, and on 1 and 2 Ray workers")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each --ray run (default 1)")
    p.add_argument("--cluster-join", type=Path, metavar="ABLATION",
                   help="instead: this grid on a one-node local Ray cluster, alone and with a second node "
                   "joining after its first trial (wall time, packing, join-to-first-trial latency)")
    p.add_argument("--data", type=Path, metavar="CONFIG", help="instead: this config's training loader (0, 1, 2 "
                   "processes) beside its training step, in images/s, and the padding aspect-ratio grouping saves")
    p.add_argument("--gpu-smoke", action="store_true", help="instead: the CUDA paths on one GPU (quick teacher and "
                   "Dist2 epochs with AMP, the latter on a 1-worker NCCL worker group; paper-scale img/s); exit 2 "
                   "without CUDA")
    p.add_argument("--coco-eval", action="store_true", help="instead: each COCOeval backend (eval.backend) on a "
                   "generated COCO-val-sized problem: seconds, peak memory, the numbers they give")
    p.add_argument("--images", type=int, default=5000, help="images of the --coco-eval problem (default 5000, "
                   "as COCO val2017; 100 detections each)")
    p.set_defaults(func=cmd_bench)
    return parser


def _stop_as_on_ctrl_c(signum, frame) -> None:
    """SIGTERM (`ray job stop`, `kill`, a scheduler's preemption) ends Python at once by default, leaving its
    MLflow runs RUNNING and a grid's Tune state unsaved: take it as Ctrl-C instead. Whatever handles SIGINT now
    runs (Tune's while a grid's phase runs: it saves its state and stops the trials; Python's otherwise:
    KeyboardInterrupt, and the runs are closed KILLED). Called directly rather than by re-sending SIGINT, which a
    process started in the background by a shell ignores."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Only the main thread may set handlers; the caller's handler comes back (main() is also called in-process).
    previous = signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c) if _in_main_thread() else None
    try:
        return args.func(args)
    except UserError as exc:
        print(f"dist2: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dist2: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
