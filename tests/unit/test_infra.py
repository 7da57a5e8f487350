"""Offline checks of infra/: the KubeRay manifests, the job specs they carry, the Dockerfile.

No Ray, no cluster, no network. Each RayJob, RayCronJob and RayCluster `spec` is validated
against the KubeRay v1.7.0 CRD schema of its kind (vendored in tests/data/kuberay/), made strict
the way the API server is: a field the schema does not declare is rejected, as
`kubectl apply` (server-side strict field validation) does, instead of being silently
pruned. The negative tests prove the validation can fail.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from koala_batch.cli.main import build_parser
from koala_batch.runtime.session import CPUS_BESIDE_ACTORS
from koala_batch.spec import SECRET_OPTION_NAMES, JobSpec, apply_overrides, spec_from_dict
from tests.conftest import REPO_ROOT

INFRA_DIR = REPO_ROOT / "infra"
KUBERAY_DIR = INFRA_DIR / "kuberay"
DOCKERFILE = INFRA_DIR / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
KUBERAY_VERSION = "v1.7.0"
CRD_DIR = REPO_ROOT / "tests" / "data" / "kuberay"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
RAY_KINDS = tuple(CRD_FILES)
MANIFEST_FILES = sorted(KUBERAY_DIR.glob("*.yaml"))
GPU = "nvidia.com/gpu"
# Env var names that carry credentials: only ever from a Secret (valueFrom.secretKeyRef).
SECRET_ENV_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE
)
AWS_KEY_ID_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Allowance per RayCronJob attempt for cluster start-up (image pull, scheduling, model load).
ATTEMPT_STARTUP_S = 30 * 60


# ---------------------------------------------------------------------------------------
# Loading


@cache
def load_documents(path: Path) -> tuple[dict[str, Any], ...]:
    with path.open() as handle:
        return tuple(doc for doc in yaml.safe_load_all(handle) if doc is not None)


def all_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFEST_FILES:
        for doc in load_documents(path):
            yield path, doc


def ray_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in all_documents() if doc.get("kind") in RAY_KINDS]


def doc_id(path: Path, doc: dict[str, Any]) -> str:
    return f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


RAY_DOCS = ray_documents()
RAY_DOC_IDS = [doc_id(path, doc) for path, doc in RAY_DOCS]
JOB_DOCS = [(path, doc) for path, doc in RAY_DOCS if doc["kind"] in ("RayJob", "RayCronJob")]
JOB_DOC_IDS = [doc_id(path, doc) for path, doc in JOB_DOCS]


def configmaps(path: Path) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for doc in load_documents(path)
        if doc.get("kind") == "ConfigMap"
    }


def job_spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayJob spec of a RayJob, or the RayJob spec template of a RayCronJob."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def cluster_spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else job_spec_of(doc)["rayClusterSpec"]


def ray_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return pod_spec["containers"][0]  # KubeRay's Ray container is the first one


def head_pod(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["headGroupSpec"]["template"]["spec"]


def worker_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return cluster.get("workerGroupSpecs", [])


def all_pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", head_pod(cluster))] + [
        (group["groupName"], group["template"]["spec"]) for group in worker_groups(cluster)
    ]


def quantity(value: Any) -> Fraction:
    """A Kubernetes CPU/GPU quantity ("8", 8, "500m") as a number."""
    text = str(value)
    if text.endswith("m"):
        return Fraction(text[:-1]) / 1000
    return Fraction(text)


def container_amount(container: dict[str, Any], resource: str) -> Fraction:
    resources = container.get("resources", {})
    for section in ("limits", "requests"):
        if resource in resources.get(section, {}):
            return quantity(resources[section][resource])
    return Fraction(0)


def ray_resource(group: dict[str, Any], param: str, resource: str) -> Fraction:
    """What Ray sees on a pod: rayStartParams first, else the container's limits/requests."""
    params = group.get("rayStartParams") or {}
    if param in params:
        return quantity(params[param])
    return container_amount(ray_container(group["template"]["spec"]), resource)


def read_mounted_file(
    pod_spec: dict[str, Any], file_path: str, maps: dict[str, dict[str, Any]]
) -> str | None:
    """The text a pod sees at file_path when a ConfigMap volume provides it, else None."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    for mount in ray_container(pod_spec).get("volumeMounts", []):
        configmap = volumes.get(mount["name"], {}).get("configMap")
        if configmap is None or configmap["name"] not in maps:
            continue
        mount_path = mount["mountPath"].rstrip("/")
        if "subPath" in mount:
            if file_path != mount_path:
                continue
            relative = mount["subPath"]
        elif file_path.startswith(mount_path + "/"):
            relative = file_path[len(mount_path) + 1 :]
        else:
            continue
        key = relative
        if configmap.get("items"):
            keys = {item["path"]: item["key"] for item in configmap["items"]}
            if relative not in keys:
                continue
            key = keys[relative]
        data = maps[configmap["name"]].get("data", {})
        if key in data:
            return data[key]
    return None


def mounted_job_files(pod_spec: dict[str, Any], maps: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every *.yaml file that a ConfigMap volume mounts into the pod: {path: text}."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    files = {}
    for mount in ray_container(pod_spec).get("volumeMounts", []):
        configmap = volumes.get(mount["name"], {}).get("configMap")
        if configmap is None or configmap["name"] not in maps or "subPath" in mount:
            continue
        for key in maps[configmap["name"]].get("data", {}):
            if key.endswith((".yaml", ".yml")):
                path = f"{mount['mountPath'].rstrip('/')}/{key}"
                files[path] = read_mounted_file(pod_spec, path, maps)
    return files


def parse_entrypoint(entrypoint: str):
    """The entrypoint through koala-batch's own argument parser (argv[0] must be koala-batch)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["koala-batch", "run"], (
        f"entrypoint must run `koala-batch run SPEC ...`, got {argv[:2]}"
    )
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"koala-batch's parser rejects the entrypoint: {entrypoint!r}")


def resolved_job_spec(path: Path, doc: dict[str, Any]) -> tuple[JobSpec, Any]:
    """The JobSpec the entrypoint runs: the ConfigMap's spec on the head with its --set applied."""
    args = parse_entrypoint(job_spec_of(doc)["entrypoint"])
    assert args.spec.startswith("/"), f"use an absolute spec path, got {args.spec}"
    text = read_mounted_file(head_pod(cluster_spec_of(doc)), args.spec, configmaps(path))
    assert text is not None, (
        f"{args.spec} is not provided to the head pod by a ConfigMap in {path.name}"
    )
    overrides = list(args.overrides)
    if args.overwrite:  # as koala_batch.cli.main._load does
        overrides.append("output.overwrite=true")
    raw = yaml.safe_load(text)
    return spec_from_dict(apply_overrides(raw, overrides), source=args.spec), args


def job_specs_of(path: Path, doc: dict[str, Any]) -> list[tuple[str, JobSpec]]:
    """Every job spec a manifest runs (RayJob, RayCronJob) or offers on its head (RayCluster)."""
    if doc["kind"] != "RayCluster":
        spec, args = resolved_job_spec(path, doc)
        return [(f"{args.spec} with the entrypoint's --set", spec)]
    files = mounted_job_files(head_pod(cluster_spec_of(doc)), configmaps(path))
    return [
        (file_path, spec_from_dict(yaml.safe_load(text), source=file_path))
        for file_path, text in files.items()
    ]


# ---------------------------------------------------------------------------------------
# CRD schemas


@cache
def crd_spec_schema(kind: str) -> dict[str, Any]:
    """spec.versions[name=v1].schema.openAPIV3Schema.properties.spec of the kind's CRD."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def strict(schema: Any) -> Any:
    """The schema with undeclared fields rejected, as the API server's strict validation does.

    Objects without `additionalProperties` or `x-kubernetes-preserve-unknown-fields` keep
    only their declared properties in Kubernetes (structural schema pruning); `kubectl
    apply` rejects the others. jsonschema would accept them: close those objects.
    `x-kubernetes-*` keywords (int-or-string, CEL validations...) are unknown to
    jsonschema and ignored; int-or-string is spelled out as anyOf in these CRDs.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if (
        schema.get("type") == "object"
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@cache
def validator(kind: str, strict_fields: bool = True) -> jsonschema.Draft7Validator:
    schema = crd_spec_schema(kind)
    return jsonschema.Draft7Validator(strict(schema) if strict_fields else schema)


def schema_errors(kind: str, spec: dict[str, Any], strict_fields: bool = True) -> list[str]:
    errors = sorted(
        validator(kind, strict_fields).iter_errors(spec),
        key=lambda error: list(map(str, error.absolute_path)),
    )
    return [
        f"{'.'.join(['spec', *map(str, error.absolute_path)])}: {error.message}" for error in errors
    ]


# ---------------------------------------------------------------------------------------
# The manifests are there and well-formed


def test_manifests_hold_the_expected_resources():
    kinds = {
        path.name: sorted(doc["kind"] for doc in load_documents(path)) for path in MANIFEST_FILES
    }
    assert kinds == {
        "raycluster.yaml": ["ConfigMap", "RayCluster"],
        "raycronjob-nightly.yaml": ["ConfigMap", "RayCronJob"],
        "rayjob-koala-700m.yaml": ["ConfigMap", "RayJob"],
    }


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_documents_have_api_version_kind_and_dns_name(path):
    for doc in load_documents(path):
        expected = "ray.io/v1" if doc["kind"] in RAY_KINDS else "v1"
        assert doc["apiVersion"] == expected, doc_id(path, doc)
        name = doc["metadata"]["name"]
        # KubeRay derives cluster, job and service names from it: a DNS-1035 label, short.
        assert DNS_1035_LABEL.match(name) and len(name) <= 30, name


# ---------------------------------------------------------------------------------------
# The CRD schemas accept every manifest, and reject broken ones


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=RAY_DOC_IDS)
def test_spec_is_valid_for_the_kuberay_crd(path, doc):
    assert schema_errors(doc["kind"], doc["spec"]) == []


def test_crd_schemas_are_valid_json_schemas():
    for kind in RAY_KINDS:
        jsonschema.Draft7Validator.check_schema(strict(crd_spec_schema(kind)))


def _first(kind: str) -> tuple[Path, dict[str, Any]]:
    return next((path, doc) for path, doc in RAY_DOCS if doc["kind"] == kind)


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# (kind, what is broken, mutation of a copy of the spec, text an error must contain)
BROKEN = [
    (
        "RayJob",
        "boolean given as a string",
        lambda s: s.update(shutdownAfterJobFinishes="yes"),
        "spec.shutdownAfterJobFinishes",
    ),
    (
        "RayJob",
        "misspelled field",
        lambda s: _rename(s, "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)",
    ),
    (
        "RayJob",
        "integer given as a string",
        lambda s: s.update(backoffLimit="2"),
        "spec.backoffLimit",
    ),
    (
        "RayJob",
        "rayStartParams value not a string",
        lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus",
    ),
    (
        "RayJob",
        "worker group without maxReplicas",
        lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        "spec.rayClusterSpec.workerGroupSpecs.0",
    ),
    (
        "RayJob",
        "GPU limit that is not a quantity",
        lambda s: ray_container(s["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"])[
            "resources"
        ]["limits"].update({GPU: "one"}),
        "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits",
    ),
    (
        "RayJob",
        "secretKeyRef without key",
        lambda s: ray_container(head_pod(s["rayClusterSpec"]))["env"][0]["valueFrom"][
            "secretKeyRef"
        ].pop("key"),
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.env.0.valueFrom.secretKeyRef",
    ),
    (
        "RayJob",
        "misspelled container field",
        lambda s: _rename(
            ray_container(head_pod(s["rayClusterSpec"])), "volumeMounts", "volumeMount"
        ),
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0",
    ),
    (
        "RayCronJob",
        "jobTemplate wrapped in spec: as in a batch/v1 CronJob",
        lambda s: s.update(jobTemplate={"spec": s["jobTemplate"]}),
        "spec.jobTemplate",
    ),
    (
        "RayCronJob",
        "schedule missing",
        lambda s: s.pop("schedule"),
        "spec: 'schedule' is a required property",
    ),
    ("RayCronJob", "schedule not a string", lambda s: s.update(schedule=2), "spec.schedule"),
    (
        "RayCluster",
        "misspelled rayStartParams",
        lambda s: _rename(s["headGroupSpec"], "rayStartParams", "rayStartParam"),
        "spec.headGroupSpec",
    ),
    (
        "RayCluster",
        "autoscaler upscalingMode outside its enum",
        lambda s: s["autoscalerOptions"].update(upscalingMode="Fast"),
        "spec.autoscalerOptions.upscalingMode",
    ),
]


@pytest.mark.parametrize(
    ("kind", "what", "mutate", "expected"),
    BROKEN,
    ids=[f"{kind}-{what}" for kind, what, _, _ in BROKEN],
)
def test_broken_copy_of_a_manifest_is_rejected(kind, what, mutate, expected):
    _, doc = _first(kind)
    spec = copy.deepcopy(doc["spec"])
    mutate(spec)
    errors = schema_errors(kind, spec)
    assert errors, f"{kind} with {what} was accepted"
    assert any(expected in error for error in errors), errors


def test_type_errors_fail_even_without_strict_fields():
    _, doc = _first("RayJob")
    spec = copy.deepcopy(doc["spec"])
    spec["shutdownAfterJobFinishes"] = "yes"
    assert schema_errors("RayJob", spec, strict_fields=False)


def test_the_crd_alone_lets_unknown_fields_through_so_the_test_closes_them():
    """Why `strict`: the CRD schema sets no additionalProperties: a typo would pass unseen."""
    _, doc = _first("RayJob")
    spec = copy.deepcopy(doc["spec"])
    _rename(spec, "shutdownAfterJobFinishes", "shutdownAfterJobFinish")
    assert schema_errors("RayJob", spec, strict_fields=False) == []
    assert schema_errors("RayJob", spec) != []


# ---------------------------------------------------------------------------------------
# The job specs: what the entrypoints run, and what the cluster offers


@pytest.mark.parametrize(("path", "doc"), JOB_DOCS, ids=JOB_DOC_IDS)
def test_entrypoint_runs_the_configmap_spec_with_its_overrides(path, doc):
    spec, args = resolved_job_spec(path, doc)
    sets = dict(override.split("=", 1) for override in args.overrides)
    assert args.command == "run"
    assert sets.keys() >= {"input.uri", "output.uri"}
    # An override's value is YAML (koala_batch.spec.apply_overrides): a list of partitions.
    assert spec.input.uri == yaml.safe_load(sets["input.uri"])
    assert spec.output.uri == sets["output.uri"]
    # Retries (backoffLimit) and cron runs rerun the same command: it must resume.
    assert not args.overwrite and not spec.output.overwrite
    # Ray Jobs gives the driver RAY_ADDRESS; a fixed address in the spec would override it.
    assert spec.compute.ray_address is None
    assert spec.model.name.startswith("koala-")


@pytest.mark.parametrize(("path", "doc"), JOB_DOCS, ids=JOB_DOC_IDS)
def test_driver_runs_where_the_spec_is_mounted(path, doc):
    """Without entrypoint resources Ray places the driver on the head; with them, anywhere."""
    job = job_spec_of(doc)
    args = parse_entrypoint(job["entrypoint"])
    if any(
        job.get(key) for key in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources")
    ):
        for name, pod in all_pods(cluster_spec_of(doc)):
            assert read_mounted_file(pod, args.spec, configmaps(path)) is not None, name


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_every_configmap_job_spec_is_valid(path):
    for name, configmap in configmaps(path).items():
        specs = {
            key: text
            for key, text in configmap.get("data", {}).items()
            if key.endswith((".yaml", ".yml"))
        }
        assert specs, f"ConfigMap {name} holds no job spec"
        for key, text in specs.items():
            spec = spec_from_dict(yaml.safe_load(text), source=f"{name}/{key}")
            assert not spec.output.overwrite, f"{name}/{key}"


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=RAY_DOC_IDS)
def test_generator_actors_fit_the_gpu_workers(path, doc):
    specs = job_specs_of(path, doc)
    assert specs, f"{doc_id(path, doc)} runs or offers no job spec"
    for where, spec in specs:
        check_actors_fit(where, spec, cluster_spec_of(doc))


def check_actors_fit(where: str, spec: JobSpec, cluster: dict[str, Any]) -> None:
    gpus_per_actor = (
        Fraction(1)
        if spec.compute.num_gpus_per_actor == "auto"
        else Fraction(spec.compute.num_gpus_per_actor)
    )
    cpus_per_actor = Fraction(spec.compute.num_cpus_per_actor)
    assert gpus_per_actor > 0, f"{where}: a KOALA job on GPU workers should ask for GPUs"
    capacity = 0
    for group in worker_groups(cluster):
        gpus = ray_resource(group, "num-gpus", GPU)
        cpus = ray_resource(group, "num-cpus", "cpu")
        per_pod = int(gpus // gpus_per_actor)
        if per_pod == 0:
            continue
        # The actors' CPUs plus room for the read/rebundle/write tasks (the head has none).
        assert per_pod * cpus_per_actor + CPUS_BESIDE_ACTORS <= cpus, (
            f"{where}: {group['groupName']}: {per_pod} actor(s) x {cpus_per_actor} CPU leave "
            f"no room for the light stages on {cpus} CPUs"
        )
        capacity += per_pod * group["maxReplicas"]
    min_actors, max_actors = spec.compute.actor_range
    assert capacity >= max_actors >= min_actors, (
        f"{where}: compute.actors asks for up to {max_actors} actors; the GPU workers hold "
        f"{capacity}"
    )


# ---------------------------------------------------------------------------------------
# Cluster shape: CPU head, GPU workers, one image, one Ray version


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=RAY_DOC_IDS)
def test_head_is_cpu_only(path, doc):
    cluster = cluster_spec_of(doc)
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    assert container_amount(ray_container(head_pod(cluster)), GPU) == 0


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=RAY_DOC_IDS)
def test_gpu_worker_groups_request_gpus(path, doc):
    groups = worker_groups(cluster_spec_of(doc))
    assert groups, "no worker group"
    for group in groups:
        resources = ray_container(group["template"]["spec"]).get("resources", {})
        limit = resources.get("limits", {}).get(GPU)
        assert limit is not None and quantity(limit) >= 1, group["groupName"]
        if GPU in resources.get("requests", {}):
            # Kubernetes requires requests == limits for extended resources.
            assert quantity(resources["requests"][GPU]) == quantity(limit)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


def ray_pin() -> str:
    (pin,) = re.findall(r"^ray==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    return pin


def test_one_ray_version_and_one_image_everywhere():
    images = set()
    for path, doc in RAY_DOCS:
        cluster = cluster_spec_of(doc)
        assert cluster["rayVersion"] == ray_pin(), doc_id(path, doc)
        images |= {ray_container(pod)["image"] for _, pod in all_pods(cluster)}
    assert len(images) == 1, images
    assert dockerfile_args()["RAY_VERSION"] == ray_pin()


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=RAY_DOC_IDS)
def test_workers_mount_the_model_cache_at_hf_home(path, doc):
    hf_home = dockerfile_env()["HF_HOME"]
    for group in worker_groups(cluster_spec_of(doc)):
        mounts = ray_container(group["template"]["spec"]).get("volumeMounts", [])
        assert hf_home in {mount["mountPath"] for mount in mounts}, group["groupName"]


# ---------------------------------------------------------------------------------------
# Retries, clean-up and schedule


def test_rayjob_retries_and_cleans_up():
    ((_, doc),) = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayJob"]
    spec = doc["spec"]
    assert spec["backoffLimit"] >= 1  # a failed attempt is rerun: resume makes that safe
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0


def test_nightly_job_accumulates_a_window_of_date_partitions_into_one_output():
    ((path, doc),) = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayCronJob"]
    spec, _ = resolved_job_spec(path, doc)
    assert spec.output.accumulate
    assert spec.input.id_column  # ids stable across days, not file#row
    assert isinstance(spec.input.uri, list) and len(spec.input.uri) == 2
    assert all(re.search(r"/date=\$\(date -u -d [^)]+ \+%F\)/$", uri) for uri in spec.input.uri)
    assert "$(" not in spec.output.uri  # one fixed output, never a dated one


def test_nightly_attempts_cannot_overlap_the_next_night():
    ((_, doc),) = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayCronJob"]
    schedule = doc["spec"]["schedule"]
    assert re.fullmatch(r"\d{1,2} \d{1,2} \* \* \*", schedule), f"not daily: {schedule}"
    job = doc["spec"]["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True
    attempts = job.get("backoffLimit", 0) + 1
    per_attempt = job["activeDeadlineSeconds"] + job["ttlSecondsAfterFinished"] + ATTEMPT_STARTUP_S
    assert attempts * per_attempt < 24 * 3600


# ---------------------------------------------------------------------------------------
# Secrets: only by reference


def env_entries(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from (entry for entry in value if isinstance(entry, dict))
            yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


def test_no_manifest_holds_a_secret_value():
    for path in MANIFEST_FILES:
        text = path.read_text()
        assert not AWS_KEY_ID_VALUE.search(text), f"{path.name} holds an AWS access key id"
        for doc in load_documents(path):
            assert doc["kind"] != "Secret", f"{path.name} defines a Secret: create it apart"
            for entry in env_entries(doc):
                if SECRET_ENV_NAME.search(entry["name"]):
                    assert "value" not in entry, f"{path.name}: {entry['name']} is inline"
                    assert "secretKeyRef" in entry.get("valueFrom", {}), entry["name"]


def _storage_option_names(raw: dict[str, Any]) -> set[str]:
    names = set()
    for section in ("input", "output"):
        options = (raw.get(section) or {}).get("storage_options") or {}
        names |= {name.lower() for name in options}
    return names


def test_job_specs_carry_no_credentials():
    for path in MANIFEST_FILES:
        for name, configmap in configmaps(path).items():
            for key, text in configmap.get("data", {}).items():
                raw = yaml.safe_load(text)
                assert not _storage_option_names(raw) & SECRET_OPTION_NAMES, f"{name}/{key}"
    for _path, doc in JOB_DOCS:
        args = parse_entrypoint(job_spec_of(doc)["entrypoint"])
        for override in args.overrides:
            assert "storage_options" not in override.split("=", 1)[0], override


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=RAY_DOC_IDS)
def test_aws_credentials_reach_every_ray_container_from_a_secret(path, doc):
    for name, pod in all_pods(cluster_spec_of(doc)):
        env = {entry["name"]: entry for entry in ray_container(pod).get("env", [])}
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert variable in env, f"{name} lacks {variable}"
            assert "secretKeyRef" in env[variable].get("valueFrom", {}), (
                f"{name}: {variable} is not taken from a Secret"
            )
            reference = env[variable]["valueFrom"]["secretKeyRef"]
            assert reference["name"] and reference["key"]
            assert not reference.get("optional", False), f"{name}: {variable} is optional"


# ---------------------------------------------------------------------------------------
# Dockerfile and build context


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default.strip('"'))
    return args


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return env


def test_dockerfile_builds_on_the_matching_ray_gpu_image():
    args = dockerfile_args()
    (base,) = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cu\d+", image)
    assert match, image
    assert match.group(1) == ray_pin()


def test_dockerfile_installs_with_the_constraints():
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    installs = [
        command
        for run in runs
        for command in re.split(r"&&|;", run)
        if re.search(r"\bpip3? install\b", command)
    ]
    assert installs
    for command in installs:
        assert re.search(r"(-c|--constraint)\s+constraints\.txt\b", command), command
    assert any(re.search(r"\s\.$", command.strip()) for command in installs), (
        "no `pip install -c constraints.txt .`"
    )
    copied = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "COPY")
    assert "constraints.txt" in copied and "pyproject.toml" in copied


def test_dockerfile_sets_hf_home_and_bakes_no_weights_by_default():
    assert dockerfile_env()["HF_HOME"].startswith("/")
    assert dockerfile_args().get("PRELOAD_MODEL", "missing") == ""


def test_dockerignore_keeps_local_state_out_of_the_context():
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "out", ".git"} <= entries
