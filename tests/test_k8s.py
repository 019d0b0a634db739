"""The Kubernetes manifests (deploy/k8s), checked offline: no cluster runs here. Every object is validated against
the Kubernetes OpenAPI schemas that the `kubernetes-validate` wheel ships (strict: unknown fields fail), the GPU
overlay's patch after merging it into the base Deployment, and both kustomizations as `kubectl kustomize` renders
them (when kubectl is installed). Then the wiring, in plain Python: probes, ports, selectors, the Secret key, the
bundle volume, and the names and conventions shared with the Dockerfile, docker-compose.yml and the service."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the dev extra) is not installed: pip install -e '.[dev]'"
)

K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
GPU = K8S / "gpu"
# The oldest release still in the upstream support window when this was written; the manifests use nothing newer
# (matchLabelKeys, unhealthyPodEvictionPolicy and the v2 HPA all exist in it).
K8S_VERSION = "1.30.0"
SERVE_PORT = 8000  # the Dockerfile's EXPOSE and POD_PORT, checked below


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes object file: the base, the templates at the top; not kustomizations or the patch."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.parent != GPU)


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def by_kind(objects: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for obj in objects:
        assert obj["kind"] not in out, f"two {obj['kind']} objects"
        out[obj["kind"]] = obj
    return out


@pytest.fixture(scope="module")
def base() -> dict[str, dict]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return by_kind([doc for name in kustomization["resources"] for doc in documents(BASE / name)])


@pytest.fixture(scope="module")
def gpu_patch() -> dict:
    (patch,) = documents(GPU / "deployment-gpu.yaml")
    return patch


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def port_number(c: dict, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return number


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


# Strategic merge, as far as the GPU patch needs it: maps merge, these lists merge by their key (new items first,
# as kustomize puts them), other lists are replaced.
MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "name"}


def strategic_merge(target: dict, patch: dict) -> dict:
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            merge_key, merged, new = MERGE_KEYS[key], list(out[key]), []
            for item in value:
                at = [i for i, old in enumerate(merged) if old[merge_key] == item[merge_key]]
                if at:
                    merged[at[0]] = strategic_merge(merged[at[0]], item)
                else:
                    new.append(copy.deepcopy(item))
            out[key] = new + merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def serve_stage() -> str:
    """The Dockerfile's `serve` stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    m = re.search(r"^FROM \S+ AS serve\n(.*?)(?=^FROM )", text, re.M | re.S)
    assert m, "no `serve` stage in the Dockerfile"
    return m.group(1)


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


# --------------------------------------------------------------------------------------------- schemas


def test_the_schemas_ship_offline():
    """The version asked for is one the wheel carries (no download): validate() says which it used."""
    (deployment,) = documents(BASE / "deployment.yaml")
    assert kubernetes_validate.validate(deployment, K8S_VERSION, strict=True) == "1.30"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_matches_the_kubernetes_schema(path):
    docs = documents(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        assert "namespace" not in doc["metadata"], "namespace-agnostic: `-n` or a kustomization picks it"
        validate(doc)


def test_the_validator_is_not_vacuous(base):
    """Strict mode catches a misspelt field and a wrong type, so the passes above mean something."""
    typo = copy.deepcopy(base["Deployment"])
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    wrong_type = copy.deepcopy(base["Service"])
    wrong_type["spec"]["ports"][0]["port"] = "eighty"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken)


def test_gpu_patch_targets_the_deployment_and_merges_into_a_valid_one(base, gpu_patch):
    deployment = base["Deployment"]
    assert (gpu_patch["apiVersion"], gpu_patch["kind"]) == (deployment["apiVersion"], deployment["kind"])
    assert gpu_patch["metadata"]["name"] == deployment["metadata"]["name"] == "pod-serve"
    assert [c["name"] for c in gpu_patch["spec"]["template"]["spec"]["containers"]] == [container(deployment)["name"]]
    merged = strategic_merge(deployment, gpu_patch)
    validate(merged)

    c = container(merged)
    assert c["image"] == compose_services()["server-gpu"]["image"]  # pod-rec/serve-gpu:<version>
    assert env(c)["POD_PROVIDER"]["value"] == "cuda"
    assert env(c)["POD_BUNDLE"] == env(container(deployment))["POD_BUNDLE"]  # the base's env is kept
    for kind in ("requests", "limits"):
        assert c["resources"][kind]["nvidia.com/gpu"] == 1
        assert c["resources"][kind]["cpu"] == container(deployment)["resources"][kind]["cpu"]
    tolerations = merged["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)


# --------------------------------------------------------------------------------------------- kustomize


def test_kustomizations_list_exactly_the_files_there():
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(base["resources"]) == sorted(on_disk)
    assert len(base["resources"]) == len(set(base["resources"]))
    assert {p.name for p in BASE.iterdir()} == on_disk | {"kustomization.yaml"}

    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert top["resources"] == ["base"]
    templates = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert templates == {"secret.example.yaml", "bundle-loader.example.yaml"}  # applied by hand, never by -k
    assert {p.name for p in K8S.iterdir()} == templates | {"kustomization.yaml", "base", "gpu"}

    gpu = yaml.safe_load((GPU / "kustomization.yaml").read_text())
    assert gpu["resources"] == ["../base"]
    assert [p["path"] for p in gpu["patches"]] == ["deployment-gpu.yaml"]
    assert {p.name for p in GPU.iterdir()} == {"kustomization.yaml", "deployment-gpu.yaml"}


def kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations; the checks above need none)")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@pytest.mark.parametrize("folder", [K8S, GPU], ids=["cpu", "gpu"])
def test_kustomize_renders_valid_objects(folder, base, gpu_patch):
    rendered = by_kind(kustomize(folder))
    assert set(rendered) == set(base)
    for obj in rendered.values():
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pod-rec"
    expected = strategic_merge(base["Deployment"], gpu_patch) if folder == GPU else base["Deployment"]
    assert rendered["Deployment"]["spec"] == expected["spec"]  # the merge above is what kustomize does


# --------------------------------------------------------------------------------------------- wiring


def test_deployment_serves_the_image_on_its_port(base):
    deployment, stage = base["Deployment"], serve_stage()
    c = container(deployment)
    assert c["image"] == compose_services()["server"]["image"]  # pod-rec/serve:<version>, the `serve` target
    assert c["args"] == ["serve"]
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", SERVE_PORT)
    assert re.search(rf"^EXPOSE {SERVE_PORT}$", stage, re.M)
    assert env(c)["POD_PORT"]["value"] == str(SERVE_PORT)
    assert env(c)["POD_HOST"]["value"] == "0.0.0.0"
    assert deployment["spec"]["replicas"] == 2
    assert selects(deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def test_env_names_are_server_settings():
    """Every POD_* variable set anywhere in deploy/k8s is a field the server reads (a typo would be ignored)."""
    from service.settings import ServeSettings

    names = set()
    for path in [*manifest_files(), GPU / "deployment-gpu.yaml"]:
        names |= set(re.findall(r"name: (POD_[A-Z_]+)", path.read_text()))
    trainer_only = {"POD_WORK", "POD_TRAIN_MINUTES", "POD_TRAIN_EPOCHS"}  # deploy/train-and-export.sh's
    trainer_script = (ROOT / "deploy" / "train-and-export.sh").read_text()
    assert all(name in trainer_script for name in trainer_only)
    assert names > {"POD_BUNDLE", "POD_PORT", "POD_API_TOKEN", "POD_PROVIDER"}
    for name in names - trainer_only:
        assert name.removeprefix("POD_").lower() in ServeSettings.model_fields, name


def test_probes_hit_the_health_endpoints_on_the_container_port(base):
    from service.routes import ops

    routes = {route.path for route in ops.routes}
    c = container(base["Deployment"])
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert port_number(c, get["port"]) == SERVE_PORT
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load and warm-up need time"


def test_scrape_annotations_name_the_metrics_port(base):
    from service.routes import ops

    annotations = base["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container(base["Deployment"])["ports"][0]["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics" in {route.path for route in ops.routes}


def test_service_targets_the_deployment_port(base):
    service, deployment = base["Service"], base["Deployment"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", 80)
    assert port_number(container(deployment), port["targetPort"]) == SERVE_PORT


def test_hpa_and_pdb_act_on_the_deployment(base):
    hpa, pdb, deployment = base["HorizontalPodAutoscaler"], base["PodDisruptionBudget"], base["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "pod-serve")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(deployment)["resources"]["requests"], "utilization is relative to the request"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60

    assert pdb["spec"]["minAvailable"] == 1 < hpa["spec"]["minReplicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_pods_are_locked_down_and_drain(base):
    from service.settings import ServeSettings

    spec = base["Deployment"]["spec"]["template"]["spec"]
    c = container(base["Deployment"])
    uid = int(re.search(r"^USER (\d+):\d+$", serve_stage(), re.M).group(1))
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    assert spec["enableServiceLinks"] is False  # else a Service named `pod` would inject POD_PORT=tcp://...
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]

    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = ServeSettings.model_fields["request_timeout_s"].default  # admitted requests finish after SIGTERM
    assert spec["terminationGracePeriodSeconds"] > int(sleep[1]) + drain

    for spread in spec["topologySpreadConstraints"]:
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert selects(
            spread["labelSelector"]["matchLabels"], base["Deployment"]["spec"]["template"]["metadata"]["labels"]
        )
    assert "kubernetes.io/hostname" in {s["topologyKey"] for s in spec["topologySpreadConstraints"]}


def test_api_token_comes_from_the_example_secret(base):
    from service.dependencies import MIN_TOKEN_CHARS

    ref = env(container(base["Deployment"]))["POD_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    (secret,) = documents(K8S / "secret.example.yaml")
    assert ref["name"] == secret["metadata"]["name"] == "pod-api-token"
    assert list(secret["stringData"]) == [ref["key"]] == ["api-token"]
    assert ref["optional"] is True  # no Secret: the server runs open
    assert len(secret["stringData"]["api-token"]) < MIN_TOKEN_CHARS, "the placeholder must be refused as is"


def test_bundle_claim_is_written_by_the_job_and_read_by_the_servers(base):
    claim = base["PersistentVolumeClaim"]["metadata"]["name"]
    assert claim == "pod-bundle"

    def bundle_mount(pod_spec: dict, c: dict) -> tuple[dict, dict]:
        (volume,) = [v for v in pod_spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        return volume, mount

    server_spec = base["Deployment"]["spec"]["template"]["spec"]
    server = container(base["Deployment"])
    volume, mount = bundle_mount(server_spec, server)
    assert volume["persistentVolumeClaim"]["readOnly"] is True and mount["readOnly"] is True
    bundle = env(server)["POD_BUNDLE"]["value"]
    assert bundle.startswith(mount["mountPath"].rstrip("/") + "/")
    assert re.search(rf"^ENV .*POD_BUNDLE={re.escape(bundle)}\b", serve_stage(), re.M)  # the image's default

    job = base["Job"]
    job_spec = job["spec"]["template"]["spec"]
    (trainer,) = job_spec["containers"]
    volume, mount = bundle_mount(job_spec, trainer)
    assert not volume["persistentVolumeClaim"].get("readOnly") and not mount.get("readOnly")
    compose_trainer = compose_services()["trainer"]
    assert trainer["image"] == compose_trainer["image"]  # pod-rec/train:<version>, the `train` target
    assert trainer["command"] == compose_trainer["entrypoint"] == ["sh", "/app/deploy/train-and-export.sh"]
    for name in ("POD_BUNDLE", "POD_WORK"):
        assert env(trainer)[name]["value"] == compose_trainer["environment"][name]
    assert env(trainer)["POD_BUNDLE"]["value"] == bundle
    assert job_spec["restartPolicy"] == "Never" and job_spec["securityContext"]["fsGroup"] == 10001
    assert (ROOT / "deploy" / "train-and-export.sh").is_file()

    # The trainer's pods must not be picked up by the server's Service, PDB or spread constraints.
    assert not selects(
        base["Deployment"]["spec"]["selector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"]
    )
