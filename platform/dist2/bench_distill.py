"""`dist2 bench --distill CONFIG`: where a distillation step's time goes.

Measured on one fixed batch (median of `steps` timed steps after one warm-up step), with the config's teacher
and student architectures (random weights: timing does not depend on them):
- full training steps (forward, backward, SGD step) for student-only, FI (N2N), DI (N2N) and Dist2 All2All;
- the unavoidable parts: the student's forward+backward, the teacher's forward without grad (backbone + neck),
  and, per strategy, the teacher's remaining layers forward+backward on an injected feature;
- measured step / sum of its parts for DI and All2All (target <= 1.10), and peak memory per step kind
  (CUDA: max allocated; CPU: peak resident set of a process that runs only that kind).

With --paper-scale (`bench_distill_memory`): peak memory of one training step of each baseline and DI method
(Hint = FI N2N, PAD, NonLocal, DI N2N, Dist2 All2All) for the config's pair on synthetic 800x1333 inputs at
batch 2, the paper's scale, each kind in a process of its own, and each against Hint's.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from dist2.bench import synthetic_batch
from dist2.config import DistillConfig, load_config
from dist2.distill.distiller import Distiller
from dist2.distill.imitation import level_count
from dist2.distributed import resolve_device
from dist2.methods import ALL2ALL, HINT, STRATEGIES
from dist2.modeling.detectors import build_architecture

# The step kinds timed: a label -> (distill.method, distill.strategies).
STEPS = {"student": ("student", ["N2N"]), "FI N2N": ("fi", ["N2N"]), "DI N2N": ("di", ["N2N"]),
         "Dist2 All2All": ("dist2", [ALL2ALL])}
PAPER_STEPS = {"Hint = FI N2N": HINT, "PAD": ("pad", ["N2N"]), "NonLocal": ("nonlocal", ["N2N"]),
               "DI N2N": ("di", ["N2N"]), "Dist2 All2All": ("dist2", [ALL2ALL])}
PAPER_INPUT = (800, 1333)


def _setup(path: Path, batch_size: int | None):
    cfg = load_config(path, ["data.root=null"])
    teacher_cfg = load_config(cfg.teacher.config, ["data.root=null"])
    device = resolve_device(cfg.train.device)
    batch = batch_size or cfg.train.batch_size
    data, images, targets = synthetic_batch(cfg.data, batch, device)
    student = build_architecture(cfg.model, cfg.data, len(data.categories), download=False).to(device)
    teacher = build_architecture(teacher_cfg.model, cfg.data, len(data.categories), download=False).to(device)
    return cfg, device, images, targets, student, teacher


def _time(fn, steps: int, device) -> float:
    times = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _training_step(student, teacher, method: str, strategies: list[str], images, targets, device):
    """A function running one full training step (forward, backward, SGD step) of `method` on the batch."""
    distiller = Distiller(student, teacher, DistillConfig(method=method, strategies=strategies)).to(device).train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss = sum(distiller(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _kinds(cfg, device, images, targets, student, teacher):
    """name -> a function running one step of that kind."""
    kinds = {f"step: {name}": _training_step(student, teacher, method, strategies, images, targets, device)
             for name, (method, strategies) in STEPS.items()}

    probe = Distiller(student, teacher, DistillConfig(method="di", strategies=[ALL2ALL])).to(device)
    image_list, prepared, _ = student.preprocess(images, targets)
    x = image_list.tensors

    def student_part():
        s_p = student.neck_stage(student.backbone_stage(x))
        anchors = student.anchors(image_list, s_p)
        out = student.head_stage(s_p)
        sum(student.loss_stage(prepared, out, anchors, student.match(prepared, anchors, s_p)).values()).backward()

    kinds["part: student fwd+bwd"] = student_part
    kinds["part: teacher fwd (no grad)"] = lambda: probe.teacher_features(x)
    t_c, t_p = probe.teacher_features(x)
    anchors = teacher.anchors(image_list, t_p)
    matched = teacher.match(prepared, anchors, t_p)
    for strategy in STRATEGIES:
        n = level_count(strategy)
        like = (t_c if strategy[2] == "B" else t_p)[:n]

        def rest(strategy=strategy, like=like):
            injected = [t.detach().clone().requires_grad_(True) for t in like]
            out = teacher.head_stage(probe.teacher_rest(strategy, injected))
            sum(teacher.loss_stage(prepared, out, anchors, matched).values()).backward()

        kinds[f"part: teacher rest {strategy} fwd+bwd"] = rest
    return kinds


def _measure_in_child(path, batch_size, steps, name, queue):
    cfg, device, images, targets, student, teacher = _setup(path, batch_size)
    fn = _kinds(cfg, device, images, targets, student, teacher)[name]
    seconds = _time(fn, steps, device)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((seconds, peak_mb))


def bench_distill(path: Path, steps: int = 5, batch_size: int | None = None) -> dict[str, float]:
    cfg, device, images, targets, student, teacher = _setup(path, batch_size)
    names = list(_kinds(cfg, device, images, targets, student, teacher))
    seconds, memory = {}, {}
    for name in names:
        if device.type == "cuda":
            fn = _kinds(cfg, device, images, targets, student, teacher)[name]
            torch.cuda.reset_peak_memory_stats()
            seconds[name] = _time(fn, steps, device)
            memory[name] = torch.cuda.max_memory_allocated() / 2**20
        else:
            # One process per kind, so that its peak resident set is its own.
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            child = ctx.Process(target=_measure_in_child, args=(path, batch_size, steps, name, queue))
            child.start()
            seconds[name], memory[name] = queue.get()
            child.join()
    base = seconds["part: student fwd+bwd"] + seconds["part: teacher fwd (no grad)"]
    rest = {s: seconds[f"part: teacher rest {s} fwd+bwd"] for s in STRATEGIES}
    ratios = {"DI N2N": seconds["step: DI N2N"] / (base + rest["N2N"]),
              "Dist2 All2All": seconds["step: Dist2 All2All"] / (base + sum(rest.values()))}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"distillation step time, {Path(path).name}, batch {len(images)}, {where}")
    print(tabulate([{"what": n, "ms": 1000 * seconds[n], "peak MB": memory[n]} for n in names],
                   headers="keys", floatfmt=".1f", tablefmt="github"))
    print()
    print(tabulate([{"step": k, "measured / sum of parts": v, "target": "<= 1.10"} for k, v in ratios.items()],
                   headers="keys", floatfmt=".3f", tablefmt="github"))
    return ratios


def _paper_step(path: Path, method: str, strategies: list[str]):
    """One training step of `method` on two random 800x1333 images with a few boxes each."""
    cfg = load_config(path, ["data.root=null"])
    teacher_cfg = load_config(cfg.teacher.config, ["data.root=null"])
    device = resolve_device(cfg.train.device)
    classes = 80
    student = build_architecture(cfg.model, cfg.data, classes, download=False).to(device)
    teacher = build_architecture(teacher_cfg.model, cfg.data, classes, download=False).to(device)
    torch.manual_seed(0)
    h, w = PAPER_INPUT
    images = [torch.rand(3, h, w, device=device) for _ in range(2)]
    boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0], [600.0, 200.0, 900.0, 700.0], [50.0, 400.0, 250.0, 780.0]])
    targets = [{"boxes": boxes.to(device), "labels": torch.tensor([1, 5, 9], device=device)} for _ in images]
    return _training_step(student, teacher, method, strategies, images, targets, device), device


def _paper_memory_in_child(path, method, strategies, queue):
    step, device = _paper_step(path, method, strategies)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # before the clock stops: the step's kernels run asynchronously
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put((seconds, peak))


def bench_distill_memory(path: Path) -> dict[str, float]:
    """Peak memory of one paper-scale training step per method, each in a fresh process; returns MB by method."""
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for name, (method, strategies) in PAPER_STEPS.items():
        queue = ctx.Queue()
        child = ctx.Process(target=_paper_memory_in_child, args=(path, method, strategies, queue))
        child.start()
        seconds, peak = queue.get()
        child.join()
        rows.append({"method": name, "peak MB": peak, "s/step": seconds})
    hint = rows[0]["peak MB"]
    for row in rows:
        row["× Hint"] = row["peak MB"] / hint
    what = ("CUDA max_memory_allocated" if torch.cuda.is_available() else
            f"CPU peak resident set of the step's process, {torch.get_num_threads()} threads")
    print(f"paper-scale step memory, {Path(path).name}, batch 2 at {PAPER_INPUT[0]}x{PAPER_INPUT[1]}, {what}")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    return {row["method"]: row["peak MB"] for row in rows}
