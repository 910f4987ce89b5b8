"""The rules by which an ablation's trials are admitted to a cluster (dist2.ablation.scheduling), without one;
the clusters themselves run in test_ablate.py and test_autoscale.py."""

import pytest

from dist2.ablation.scheduling import HEAD_NODE, Footprint, refuse_impossible
from dist2.errors import UserError

GPU_NODE_TYPES = {"head": {"CPU": 0.0}, "gpu_worker": {"CPU": 96.0, "GPU": 1.0}}


@pytest.mark.parametrize("workers, cpus, gpus, capacity, slots", [
    (1, 1, 0, {"CPU": 5.0}, 5),
    (1, 2, 0, {"CPU": 5.0}, 2),
    (1, 1, 1, {"CPU": 5.0, "GPU": 2.0}, 2),  # the GPUs decide
    (2, 2, 1, {"CPU": 5.0, "GPU": 2.0}, 1),
    (2, 2, 0, {"CPU": 3.0}, 0),  # nothing fits: wait
    (1, 1, 1, {"CPU": 8.0}, 0),  # a cluster without GPUs holds no GPU trial
])
def test_slots_count_whole_footprints_of_the_live_capacity(workers, cpus, gpus, capacity, slots):
    assert Footprint.of(workers, cpus, gpus).slots(capacity) == slots


def test_a_one_worker_trial_holds_its_worker_and_a_larger_one_a_sliver_of_the_head():
    one = Footprint.of(1, 2, 1).trial_resources()
    assert one.bundles == [{"CPU": 2.0, "GPU": 1.0}]
    # Ray Train V2 places the workers in a placement group of its own: the trial must not hold them too.
    group = Footprint.of(4, 2, 1)
    assert group.trial_resources().bundles == [{HEAD_NODE: 0.01}]
    assert group.bundles() == [{"CPU": 2.0, "GPU": 1.0}] * 4 and group.total == {"CPU": 8.0, "GPU": 4.0}
    assert (str(group), group.sized_by, Footprint.of(1, 3, 0).sized_by) == ("4 workers × {CPU: 2, GPU: 1}", "GPU",
                                                                          "CPU")


def test_a_worker_wider_than_every_node_type_is_refused_naming_the_resource():
    with pytest.raises(UserError) as caught:
        refuse_impossible(Footprint.of(1, 4, 2), GPU_NODE_TYPES, nodes=[{"CPU": 2.0}])
    assert str(caught.value) == ("resources: one worker needs {CPU: 4, GPU: 2}; no node type of the cluster's "
                                 "autoscaler (gpu_worker, head) has that much GPU (at most 1); lower "
                                 "resources.cpus_per_worker / gpus_per_worker, or add such a node type")


@pytest.mark.parametrize("footprint, node_types, nodes", [
    (Footprint.of(8, 4, 1), GPU_NODE_TYPES, []),  # every worker fits a gpu_worker: the autoscaler adds them
    (Footprint.of(1, 4, 2), GPU_NODE_TYPES, [{"CPU": 8.0, "GPU": 2.0}]),  # a node added by hand holds it
    (Footprint.of(1, 4, 2), None, []),  # no autoscaler known: nodes may still come, the job waits
])
def test_what_some_node_can_hold_is_not_refused(footprint, node_types, nodes):
    refuse_impossible(footprint, node_types, nodes)


def test_packing_counts_only_trial_seconds_inside_the_phase():
    """A resumed grid's results include trials that finished under an earlier driver: they ran on no cluster this
    driver watched and must not count (a resumed grid once read 6.19, beyond the possible 1)."""
    from types import SimpleNamespace

    from dist2.ablation.scheduling import TRIAL_END, TRIAL_WALL, PhaseWatch

    watch = PhaseWatch("grid", Footprint.of(1, 2, 0), None)
    watch.resource_seconds = 2.0 * 100  # a 2-CPU cluster watched for 100 s
    start = watch.started_at

    def result(wall: float, end: float):
        return SimpleNamespace(metrics={TRIAL_WALL: wall, TRIAL_END: end})

    earlier = result(3000.0, start - 10)  # finished before this driver started
    straddling = result(50.0, start + 20)  # started 30 s before the phase: 20 s inside it
    inside = result(60.0, start + 90)
    unfinished = SimpleNamespace(metrics={})
    assert watch.packing([earlier, straddling, inside, unfinished]) == pytest.approx((20 + 60) * 2 / 200)
    assert watch.packing([earlier]) == 0.0
