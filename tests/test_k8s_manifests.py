"""The Kubernetes manifests under k8s/, offline: they parse, core kinds validate against the
Kubernetes schemas (kubernetes-validate), KubeRay kinds against the KubeRay CRDs, the serve
config is a valid ServeConfig, and the pieces fit together (ports, mounts, resources)."""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from distspec.server.serve import ServeConfig
from kustomize_lite import render

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
KUBERNETES_VERSION = "1.32"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
SERVE_CONFIG_KEY = "serve.yaml"
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each

KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
OVERLAYS = [k for k in KUSTOMIZATIONS if k.parent.name == "overlays"]


def name_of(k: Path) -> str:
    return str(k.relative_to(K8S))


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=name_of)
def rendered(request) -> list[dict]:
    return render(request.param)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(doc: dict) -> dict[str, dict]:
    """A Ray kind's pod templates by group name ('head' for the head group)."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    elif doc["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    templates = {}
    if "headGroupSpec" in spec:
        templates["head"] = spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def test_the_layout_is_there():
    assert K8S / "base" in KUSTOMIZATIONS
    assert {o.name for o in OVERLAYS} == {"cpu-demo", "gpu"}


def test_every_yaml_file_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert files
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs, f"{f} is empty"
        assert all(isinstance(d, dict | list) for d in docs), f


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare against")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=name_of)
def test_renders_as_kubectl_kustomize_does(kustomization):
    out = subprocess.run(
        ["kubectl", "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout

    def key(d):
        return d["kind"], d["metadata"]["name"]

    theirs = sorted(yaml.safe_load_all(out), key=key)
    assert sorted(render(kustomization), key=key) == theirs


def test_core_kinds_validate_against_kubernetes_schemas(rendered):
    """Strict: unknown fields are errors. The pod templates inside KubeRay kinds (volumes,
    Secret and ConfigMap references, resources) are checked as core PodTemplates."""
    checked = 0
    for doc in rendered:
        if doc["kind"] in RAY_KINDS:
            for group, template in pod_templates(doc).items():
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{doc['metadata']['name']}-{group}"},
                    "template": template,
                }
                kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
                checked += 1
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
    assert checked >= 5


def _strict(schema):
    """The CRD schema with unknown fields forbidden wherever it lists the known ones, as the
    API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(kind, apiVersion) -> the served version's openAPIV3Schema, made strict."""
    if not CRDS.is_dir():
        pytest.skip(f"no KubeRay CRDs at {CRDS} (the shared folder beside the repository)")
    schemas = {}
    for kind, plural in RAY_KINDS.items():
        crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=FAST_LOADER)
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = version["schema"]["openAPIV3Schema"]
                schemas[kind, f"{group}/{version['name']}"] = _strict(copy.deepcopy(schema))
    return schemas


def test_kuberay_kinds_validate_against_the_crds(rendered, crd_schemas):
    ray_docs = [d for d in rendered if d["kind"] in RAY_KINDS]
    assert {d["kind"] for d in ray_docs} == {"RayCluster", "RayJob"}
    for doc in ray_docs:
        schema = crd_schemas.get((doc["kind"], doc["apiVersion"]))
        assert schema, f"{doc['kind']} {doc['apiVersion']} is not a served version"
        jsonschema.Draft7Validator(schema).validate(doc)


def test_every_kind_is_validated(rendered):
    core = {"ConfigMap", "Service", "Deployment", "Secret"}
    assert {d["kind"] for d in rendered} <= core | set(RAY_KINDS)


def serve_config(docs: list[dict]) -> ServeConfig:
    """The one serve.yaml among the ConfigMaps, read as `distspec serve --config` reads it."""
    (text,) = [
        cm["data"][SERVE_CONFIG_KEY]
        for cm in of_kind(docs, "ConfigMap")
        if SERVE_CONFIG_KEY in cm.get("data", {})
    ]
    values = yaml.safe_load(text)
    return ServeConfig.from_dict({k.replace("-", "_"): v for k, v in values.items()})


def test_the_serve_config_is_a_valid_serve_config(rendered):
    config = serve_config(rendered)
    config.runtime_config()  # the runtime's own checks (sizes, mode)
    assert config.address == "auto"  # the job's driver joins the cluster it runs on


class Wiring:
    """The rendered manifests' pieces that must agree with one another."""

    def __init__(self, docs: list[dict]):
        (self.cluster,) = of_kind(docs, "RayCluster")
        (self.job,) = of_kind(docs, "RayJob")
        self.services = of_kind(docs, "Service")
        self.config_maps = {d["metadata"]["name"]: d for d in of_kind(docs, "ConfigMap")}
        self.serve = serve_config(docs)
        self.templates = pod_templates(self.cluster)
        self.head = self.templates["head"]["spec"]
        self.head_ports = {
            p["name"]: p["containerPort"] for p in self.head["containers"][0]["ports"]
        }
        self.entrypoint = shlex.split(self.job["spec"]["entrypoint"])
        words = self.entrypoint[2:]  # after `distspec serve`: flags and their values
        self.flags = dict(zip(words[::2], words[1::2], strict=True))

    def mount_of(self, path: str) -> dict | None:
        """The head's volume mounted at the directory holding path."""
        mounts = self.head["containers"][0]["volumeMounts"]
        volumes = {v["name"]: v for v in self.head["volumes"]}
        for m in mounts:
            if str(Path(path).parent) == m["mountPath"]:
                return volumes[m["name"]]
        return None


@pytest.fixture(scope="module")
def wiring(rendered) -> Wiring:
    return Wiring(rendered)


def test_the_job_serves_on_the_cluster(wiring):
    d = wiring
    assert d.job["spec"]["clusterSelector"]["ray.io/cluster"] == d.cluster["metadata"]["name"]
    assert d.entrypoint[:2] == ["distspec", "serve"]
    volume = d.mount_of(d.flags["--config"])
    assert volume and "configMap" in volume, "--config is not on a mounted ConfigMap"
    config_map = d.config_maps[volume["configMap"]["name"]]
    assert Path(d.flags["--config"]).name in config_map["data"]


def test_services_reach_the_server_ports(wiring):
    d = wiring
    assert d.head_ports["ds-grpc"] == d.serve.port
    assert d.head_ports["ds-metrics"] == d.serve.metrics_port
    assert d.head_ports["ds-http"] == d.serve.http_port
    for service in d.services:
        selector = service["spec"]["selector"]
        assert selector == {
            "ray.io/cluster": d.cluster["metadata"]["name"],
            "ray.io/node-type": "head",
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in d.head_ports, port
    (internal,) = [s for s in d.services if s["metadata"]["name"] == "distspec"]
    annotations = internal["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == d.serve.metrics_port


def test_tls_files_and_mounts_come_from_volumes(wiring):
    d = wiring
    for path in (d.serve.tls_cert, d.serve.tls_key, d.serve.tls_client_ca):
        if path:
            volume = d.mount_of(path)
            assert volume and "secret" in volume, f"{path} is not on a mounted Secret"
    for template in d.templates.values():
        names = {v["name"] for v in template["spec"].get("volumes", [])}
        for c in template["spec"]["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= names


def cpus(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_every_container_has_requests_and_limits(rendered):
    for doc in rendered:
        templates = pod_templates(doc) if doc["kind"] in RAY_KINDS else {}
        for template in templates.values():
            for c in template["spec"]["containers"]:
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][bound]), (c["name"], bound)


def test_groups_hold_exactly_their_ranks(wiring):
    """Ray places the target's and the drafters' placement groups by resources alone, so a
    target pod holds exactly target_tp rank bundles and a drafter pod one drafter group."""
    d = wiring
    s = d.serve
    groups = {g["groupName"]: g for g in d.cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"target", "drafters"}
    assert groups["drafters"]["replicas"] == s.num_drafters
    assert cpus(d.head["containers"][0]["resources"]["limits"]["cpu"]) >= 1
    for name, ranks in (("target", s.target_tp), ("drafters", s.drafter_tp)):
        limits = groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert cpus(limits["cpu"]) == ranks * s.cpus_per_rank, name
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus == (ranks if s.device.startswith("cuda") else 0), name
    assert d.cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
