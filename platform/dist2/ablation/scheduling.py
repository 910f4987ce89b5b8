"""Where and when an ablation's trials run on a Ray cluster that may be busy, shared, or still growing.

- **Footprint.** What one trial holds while it runs. A one-worker trial trains in its own Tune actor, so the
  actor's placement group is the worker's bundle ({CPU, GPU}). A multi-worker trial's actor only launches a
  TorchTrainer, and Ray Train V2 reserves the workers in a placement group *of its own* (it never uses the
  trial's): were the trial's group to hold the workers' bundles too, each TorchTrainer would wait forever for
  resources its own trial holds. So that actor holds a sliver of the head node (every cluster has one; the
  TorchTrainer's controller lives beside its driver anyway), and the workers' bundles are its footprint.
- **Admission** (`LiveCapacity`). Tune creates a trial, and so asks for its placement group, only while the
  cluster's *current* total resources hold one more footprint than the trials already live, and never more than
  the ablation's `max_concurrent`. Capacity, not free resources: trials wait as PENDING for what is busy now
  (other users' work, a node still starting), but Tune never starts more TorchTrainers than the cluster could
  ever hold at once, and nodes that join later raise the limit at once.
- **The autoscaler.** The grid's bundles are requested from Ray's autoscaler at start (and released at the end);
  a trial whose one worker fits no node type the autoscaler declares is refused before anything runs.
- **Waiting.** While nothing runs, a line once a minute says what one trial needs, what the cluster has, and for
  how long the job has waited; `--wait-timeout` ends the wait as Ctrl-C would (state saved, `--resume` goes on).
- **Packing efficiency**: Σ trial resource-seconds / Σ cluster resource-seconds while the phase ran, on the
  resource the trials are sized by (GPU when they use GPUs, else CPU), so it stays meaningful as nodes join.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.search import BasicVariantGenerator

from dist2.errors import UserError

log = logging.getLogger(__name__)

HEAD_NODE = "node:__internal_head__"  # Ray's resource on the head node, 1.0 in all
LAUNCHER_SHARE = 0.01  # of HEAD_NODE, held by a trial that only launches a TorchTrainer: 100 such trials at most
WAIT_REPORT_S = 60


@dataclass(frozen=True)
class Footprint:
    """The resources one trial holds: `num_workers` bundles of `per_worker` ({"CPU": c} or {"CPU": c, "GPU": g})."""

    num_workers: int
    per_worker: dict[str, float]

    @classmethod
    def of(cls, num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> "Footprint":
        per_worker = {"CPU": float(cpus_per_worker)}
        if gpus_per_worker:
            per_worker["GPU"] = float(gpus_per_worker)
        return cls(num_workers, per_worker)

    @property
    def total(self) -> dict[str, float]:
        return {k: v * self.num_workers for k, v in self.per_worker.items()}

    @property
    def sized_by(self) -> str:
        """The resource packing efficiency is measured on."""
        return "GPU" if "GPU" in self.per_worker else "CPU"

    def trial_resources(self) -> tune.PlacementGroupFactory:
        if self.num_workers == 1:
            return tune.PlacementGroupFactory([self.per_worker])
        return tune.PlacementGroupFactory([{HEAD_NODE: LAUNCHER_SHARE}])

    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.per_worker) for _ in range(self.num_workers)]

    def slots(self, capacity: dict[str, float]) -> int:
        """How many trials `capacity` holds at once (by totals: a bundle's node is Ray's business)."""
        return min(int(capacity.get(k, 0.0) // v) for k, v in self.total.items())

    def __str__(self) -> str:
        worker = "{" + ", ".join(f"{k}: {v:g}" for k, v in self.per_worker.items()) + "}"
        return worker if self.num_workers == 1 else f"{self.num_workers} workers × {worker}"


class LiveCapacity(BasicVariantGenerator):
    """Tune's grid generator, admitting a new trial only while the cluster's current total resources hold one
    more footprint than the live trials (and at most `cap` at once, when given)."""

    def __init__(self, footprint: Footprint, cap: int | None):
        super().__init__()
        self.footprint, self.cap = footprint, cap

    def next_trial(self):
        import ray

        slots = self.footprint.slots(ray.cluster_resources())
        if self.cap:
            slots = min(slots, self.cap)
        if slots < 1:
            return None  # asked again at Tune's next step
        self.max_concurrent = slots
        return super().next_trial()


# ---------------------------------------------------------------- the autoscaler

def _monitor_config() -> dict | None:
    """The autoscaling config of this cluster's autoscaler, running on this node (`ray start --head
    --autoscaling-config`, `ray up`'s ~/ray_bootstrap_config.yaml, which holds the node types' detected resources),
    or None. Another cluster's autoscaler on the same machine is told apart by its GCS port."""
    import psutil
    import ray
    import yaml

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(a.endswith("monitor.py") for a in args):
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[1] == port for a in args):
            continue  # another cluster's autoscaler on this machine
        for arg in args:
            if arg.startswith("--autoscaling-config="):
                path = Path(arg.split("=", 1)[1]).expanduser()
                try:
                    return yaml.safe_load(path.read_text())
                except (OSError, yaml.YAMLError):
                    return None
    return None


def declared_node_types() -> dict[str, dict[str, float]] | None:
    """{node type: resources} of the cluster's autoscaler, read on the head node, where `ray up` and
    `ray start --autoscaling-config` run it; None without an autoscaler there (a fixed cluster; KubeRay's
    autoscaler runs in a container of its own and is not seen)."""
    import ray

    config = ray.get(ray.remote(num_cpus=0, resources={HEAD_NODE: 0.001})(_monitor_config).remote())
    types = (config or {}).get("available_node_types") or {}
    if not types or any(not t.get("resources") for t in types.values()):
        return None  # no autoscaler, or a node type whose resources are left to detection: nothing to check
    return {name: {k: float(v) for k, v in t["resources"].items()} for name, t in types.items()}


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def refuse_impossible(footprint: Footprint, node_types: dict[str, dict[str, float]] | None,
                      nodes: list[dict[str, float]]) -> None:
    """A worker bundle that no node type of the autoscaler can hold (nor any of the cluster's `nodes` now) is a
    config mistake: exit 2 naming the resource, before anything runs. Without an autoscaler (`node_types` None)
    nodes may still be added by hand: nothing is refused."""
    if node_types is None:
        return
    shapes = list(node_types.values()) + nodes
    if any(all(shape.get(k, 0.0) >= v for k, v in footprint.per_worker.items()) for shape in shapes):
        return
    short = [k for k, v in footprint.per_worker.items() if max(s.get(k, 0.0) for s in shapes) < v]
    largest = {k: max(s.get(k, 0.0) for s in shapes) for k in short}
    raise UserError(f"resources: one worker needs {footprint}; no node type of the cluster's autoscaler "
                    f"({', '.join(sorted(node_types)) or 'none with declared resources'}) has that much "
                    + ", ".join(f"{k} (at most {largest[k]:g})" for k in short)
                    + "; lower resources.cpus_per_worker / gpus_per_worker, or add such a node type")


def request_grid(footprint: Footprint, trials: int, cap: int | None) -> None:
    """Ask the autoscaler for the bundles of the trials that may run at once (a no-op without autoscaler)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=footprint.bundles() * min(trials, cap or trials))


def release_request() -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def cluster_line(footprint: Footprint) -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return (f"one trial needs {footprint}; the cluster has "
            + ", ".join(f"{total.get(k, 0):g} {k} ({free.get(k, 0):g} free)" for k in ("CPU", "GPU")))


# ---------------------------------------------------------------- watching a phase

# What each trial reports besides its metrics: its seconds of wall time, and when it ended (epoch seconds).
TRIAL_WALL, TRIAL_END = "trial_wall_s", "trial_end_s"


class PhaseWatch:
    """The driver's view of one Tune run: its cluster resource-seconds (for packing efficiency) and its waits.
    While no trial runs, a line every minute; after `wait_timeout` seconds of it, a SIGINT to this process, which
    Tune takes as Ctrl-C (state saved, unfinished trials resumable)."""

    def __init__(self, phase: str, footprint: Footprint, wait_timeout: float | None):
        self.phase, self.footprint, self.wait_timeout = phase, footprint, wait_timeout
        self.resource_seconds = 0.0
        self.started_at = time.time()
        self.waiting_since: float | None = None
        self.timed_out = False
        self._sampled: tuple[float, float] | None = None  # (when, cluster's amount of the sized-by resource)
        self._reported: float | None = None

    def sample(self, final: bool = False) -> None:
        import ray

        now = time.monotonic()
        if self._sampled is not None and (final or now - self._sampled[0] >= 2):
            self.resource_seconds += (now - self._sampled[0]) * self._sampled[1]
        elif self._sampled is not None:
            return
        self._sampled = (now, ray.cluster_resources().get(self.footprint.sized_by, 0.0))

    def step(self, trials) -> None:
        self.sample()
        now = time.monotonic()
        if any(t.status == "RUNNING" for t in trials):
            self.waiting_since = None
            return
        self.waiting_since = self.waiting_since or now
        waited = now - self.waiting_since
        if self._reported is None or now - self._reported >= WAIT_REPORT_S:
            if waited >= 1:
                log.info("%s: waiting %.0f s for resources: %s", self.phase, waited, cluster_line(self.footprint))
            self._reported = now
        if self.wait_timeout is not None and waited >= self.wait_timeout and not self.timed_out:
            self.timed_out = True
            os.kill(os.getpid(), signal.SIGINT)

    def packing(self, results) -> float:
        """Σ trial resource-seconds / Σ cluster resource-seconds while this phase ran (1 = the cluster was never
        idle), from the trials' results (TRIAL_WALL and TRIAL_END). A trial counts for its seconds inside the phase:
        a resumed grid's trials that finished under an earlier driver ran on no cluster this watch measured."""
        seconds = sum(max(0.0, min(m[TRIAL_WALL], m[TRIAL_END] - self.started_at))
                      for m in (r.metrics or {} for r in results) if TRIAL_WALL in m and TRIAL_END in m)
        used = seconds * self.footprint.total[self.footprint.sized_by]
        return used / self.resource_seconds if self.resource_seconds > 0 else math.nan


_WATCHES: dict[str, PhaseWatch] = {}  # the driver's live watch of each phase


def watch(phase: str, footprint: Footprint, wait_timeout: float | None) -> PhaseWatch:
    _WATCHES[phase] = PhaseWatch(phase, footprint, wait_timeout)
    return _WATCHES[phase]


class Watch(tune.Callback):
    """Tune pickles its callbacks into the run's state and a restored run gets those back, so this callback
    holds only the phase's name and forwards to the driver's current PhaseWatch (this run's --wait-timeout)."""

    def __init__(self, phase: str):
        self.phase = phase

    def on_step_end(self, iteration, trials, **info):
        _WATCHES[self.phase].step(trials)

    def on_experiment_end(self, trials, **info):
        _WATCHES[self.phase].sample(final=True)
