"""Whether the generator actors fit a cluster, decided from its resources alone (no Ray)."""

from __future__ import annotations

import pytest

from koala_batch.runtime.session import (
    LIGHT_TASK_CPUS,
    ClusterView,
    actors_on_node,
    placement_problem,
)

LOCAL_4_CPUS = ClusterView(({"CPU": 4.0, "memory": 8e9},), complete=True, local=True)
# KubeRay as in infra/: a head that runs nothing, GPU workers scaled from zero (autoscaler v2).
GPU_WORKER = {"CPU": 8.0, "GPU": 1.0}
KUBERAY = ClusterView(({"CPU": 0.0},), ((GPU_WORKER, 8),), complete=True)


@pytest.mark.parametrize(
    ("actors", "cpus", "gpus", "expected"),
    [
        (100, 1.0, 0.0, ["holds at most 3 such actor(s)", "compute.actors (or its min)"]),
        (1, 64.0, 0.0, ["has 64 CPUs", "lower compute.num_cpus_per_actor"]),
        (1, 1.0, 1.0, ["has a GPU", "compute.num_gpus_per_actor to auto or 0"]),
        # Four 1-CPU actors fill all 4 CPUs: the read and write tasks would never run.
        (4, 1.0, 0.0, ["holds at most 3 such actor(s)"]),
    ],
    ids=["actors=100", "num_cpus_per_actor=64", "num_gpus_per_actor=1", "no-room-for-tasks"],
)
def test_a_local_cluster_refuses_what_it_cannot_hold(actors, cpus, gpus, expected):
    problem = placement_problem(LOCAL_4_CPUS, actors, cpus, gpus)

    assert problem is not None and "\n" not in problem
    assert problem.startswith("compute asks for ")
    assert "the local Ray cluster (4 CPUs, no GPU)" in problem
    for text in expected:
        assert text in problem
    if not gpus:  # a bigger local cluster is the other way out
        assert "raise compute.local_num_cpus" in problem


@pytest.mark.parametrize(("actors", "cpus"), [(3, 1.0), (1, 3.75), (15, 0.25), (2, 1.5)], ids=str)
def test_a_local_cluster_takes_what_fits_beside_one_light_task(actors, cpus):
    assert placement_problem(LOCAL_4_CPUS, actors, cpus, 0.0) is None


def test_the_light_task_may_sit_on_any_node():
    # Two 2-CPU nodes: four 1-CPU actors leave no room for a task, three leave a whole node
    # CPU, which one light task needs only a quarter of.
    nodes = ClusterView(({"CPU": 2.0}, {"CPU": 2.0}), complete=True)
    assert placement_problem(nodes, 3, 1.0, 0.0) is None
    assert "holds at most 3" in (placement_problem(nodes, 4, 1.0, 0.0) or "")


def test_a_cluster_that_may_grow_unseen_is_never_refused_up_front():
    # An autoscaler that does not report its node types, or nodes added by hand: only the
    # bounded wait for placement can tell.
    open_ended = ClusterView(({"CPU": 2.0},))
    assert placement_problem(open_ended, 100, 64.0, 1.0) is None


def test_autoscaled_gpu_workers_count_before_they_exist():
    assert KUBERAY.has_gpus
    assert placement_problem(KUBERAY, 1, 4.0, 1.0) is None
    assert placement_problem(KUBERAY, 8, 4.0, 1.0) is None

    too_many = placement_problem(KUBERAY, 9, 4.0, 1.0) or ""
    assert "holds at most 8 such actor(s)" in too_many
    assert "its autoscaler may add up to 8 of 8 CPUs, 1 GPUs" in too_many
    assert "add nodes" in too_many and "local_num_cpus" not in too_many

    two_gpus = placement_problem(KUBERAY, 1, 4.0, 2.0) or ""
    assert "has 4 CPUs and 2 GPUs" in two_gpus
    assert "compute.num_cpus_per_actor or compute.num_gpus_per_actor" in two_gpus


def test_an_autoscaler_without_a_limit_holds_any_count():
    unbounded = ClusterView((), ((GPU_WORKER, -1),), complete=True)
    assert placement_problem(unbounded, 500, 4.0, 1.0) is None
    assert "any number of" in unbounded.describe()


def test_a_cpu_only_cluster_has_no_gpus():
    assert not LOCAL_4_CPUS.has_gpus
    assert not ClusterView(({"CPU": 8.0, "GPU": 0.0},)).has_gpus


@pytest.mark.parametrize(
    ("resources", "cpus", "gpus", "reserve", "expected"),
    [
        ({"CPU": 4.0}, 1.0, 0.0, 0.0, 4),
        ({"CPU": 4.0}, 1.0, 0.0, LIGHT_TASK_CPUS, 3),
        ({"CPU": 0.3}, 0.1, 0.0, 0.0, 3),  # not 2, for 0.3 / 0.1 = 2.9999999999999996
        ({"CPU": 8.0, "GPU": 2.0}, 1.0, 1.0, 0.0, 2),
        ({"CPU": 8.0, "GPU": 1.0}, 1.0, 0.5, 0.0, 2),
        ({"CPU": 8.0}, 1.0, 1.0, 0.0, 0),
        ({}, 1.0, 0.0, LIGHT_TASK_CPUS, 0),
    ],
)
def test_actors_on_one_node(resources, cpus, gpus, reserve, expected):
    assert actors_on_node(resources, cpus, gpus, reserve) == expected
