"""The Helm chart, rendered and linted by the real Helm engine, and the Dockerfile (read here;
built and run by tests/e2e/test_container_image.py).

Every rendered manifest is validated against the Kubernetes API schemas; the properties users
rely on (volume at the configured data dir, probes, non-root, secrets kept out of ConfigMaps)
are asserted on the rendered objects.
"""

from __future__ import annotations

import base64
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from mirror.cli import _parser, config_from_args
from mirror.config import WebhookConfig, load_config
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.procs import mirror_process, run

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mirror"
KUBERNETES = "1.33.0"
CRDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator kinds: no upstream schema
HUB_PASSWORD = "hub-s3cret-password"
QUAY_PASSWORD = "quay-s3cret-password"

ALL_FEATURES: dict[str, Any] = {
    "upstream": {"username": "acme", "password": HUB_PASSWORD, "tokenRealms": ["auth.example"]},
    "registries": {
        "ghcr.io": {"url": "https://ghcr.io", "username": "bot", "existingSecret": "ghcr-token",
                    "existingSecretKey": "token", "tagTTL": "10m"},
        "quay.io": {"url": "https://quay.io", "username": "q", "password": QUAY_PASSWORD,
                    "private": "passthrough"},
    },
    "config": {"maxAge": "30d", "maxSize": "90GiB", "logFormat": "text", "webUi": "admin",
               "webhooks": [{"url": "http://ci.ops/hook"},
                            {"url": "https://cd.ops/x", "events": ["tag.updated"]}]},
    "tls": {"enabled": True, "secretName": "mirror-tls"},
    "persistence": {"size": "100Gi", "storageClass": "fast-ssd"},
    "service": {"type": "NodePort", "nodePort": 30500},
    "ingress": {"enabled": True, "className": "nginx", "hosts": [{"host": "mirror.example.com"}],
                "tls": [{"secretName": "mirror-example", "hosts": ["mirror.example.com"]}]},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "grafanaDashboard": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
}  # fmt: skip


def render(values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Rendered objects, and NOTES.txt."""
    out = helm_python.Chart.load(CHART).render(values, name="hub", namespace="ops")
    notes = out.pop("mirror/templates/NOTES.txt", "")
    objects = [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return found


def mirror_toml(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(objects, "ConfigMap", "hub-mirror")["data"]["mirror.toml"])


@pytest.mark.parametrize("values", [{}, ALL_FEATURES], ids=["defaults", "all-features"])
def test_chart_lints_and_every_manifest_validates(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=False)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    objects, notes = render(values)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for obj in objects:
        if obj["kind"] not in CRDS:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert "registry-mirrors" in notes and "hosts.toml" in notes
    if values:
        assert CRDS | {"Ingress", "Secret"} <= kinds


def test_the_volume_is_mounted_where_the_config_keeps_data() -> None:
    for values in ({}, {"persistence": {"enabled": False}}):
        objects, _ = render(values)
        data = mirror_toml(objects)["data"]
        pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == data]
        claims = one(objects, "StatefulSet")["spec"].get("volumeClaimTemplates", [])
        if values:
            assert claims == []
            assert {"name": mount["name"], "emptyDir": {}} in pod["volumes"]
        else:
            (claim,) = claims
            assert claim["metadata"]["name"] == mount["name"]
            assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    objects, _ = render(ALL_FEATURES)
    (claim,) = one(objects, "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"


@pytest.mark.parametrize("values", [{}, ALL_FEATURES], ids=["defaults", "all-features"])
def test_probes_hit_health_endpoints_on_the_listening_port(values: dict[str, Any]) -> None:
    objects, _ = render(values)
    container = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    (port,) = container["ports"]
    assert mirror_toml(objects)["listen"] == f"0.0.0.0:{port['containerPort']}"
    scheme = "HTTPS" if values else "HTTP"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):  # fmt: skip
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, port["name"], scheme)


def test_pod_runs_non_root_read_only_without_privileges() -> None:
    objects, _ = render({})
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    ctx = pod["containers"][0]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    writable = {
        m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if not m.get("readOnly")
    }
    assert writable == {"/var/lib/mirror", "/tmp"}


def test_credentials_live_only_in_a_secret_mounted_as_files(tmp_path: Path) -> None:
    objects, notes = render(ALL_FEATURES)
    secret = one(objects, "Secret", "-credentials")
    assert base64.b64decode(secret["data"]["docker.io"]).decode() == HUB_PASSWORD
    assert base64.b64decode(secret["data"]["quay.io"]).decode() == QUAY_PASSWORD
    assert "ghcr.io" not in secret["data"]  # comes from the user's own Secret
    for obj in [o for o in objects if o is not secret]:
        text = json.dumps(obj)
        assert HUB_PASSWORD not in text and QUAY_PASSWORD not in text, obj["kind"]
    assert HUB_PASSWORD not in notes
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "env" not in pod["containers"][0] and "envFrom" not in pod["containers"][0]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "credentials"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "credentials"]
    files = {
        f"{mount['mountPath']}/{item['path']}": (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert files == {
        "/etc/mirror/credentials/docker.io": ("hub-mirror-credentials", "docker.io"),
        "/etc/mirror/credentials/ghcr.io": ("ghcr-token", "token"),
        "/etc/mirror/credentials/quay.io": ("hub-mirror-credentials", "quay.io"),
    }
    # The ConfigMap's TOML is a config the mirror accepts, naming exactly those files.
    toml_text = one(objects, "ConfigMap", "hub-mirror")["data"]["mirror.toml"]
    for path in files:
        local = tmp_path / Path(path).name
        local.write_text(f"secret for {local.name}\n")
        toml_text = toml_text.replace(path, str(local))
    (tmp_path / "mirror.toml").write_text(toml_text)
    config = load_config({}, {}, str(tmp_path / "mirror.toml"))
    assert config.registries["docker.io"].password == "secret for docker.io"
    assert config.registries["ghcr.io"].password == "secret for ghcr.io"
    assert config.registries["ghcr.io"].tag_ttl == 600
    assert config.registries["docker.io"].token_realms == ("auth.example",)
    assert config.max_age == 30 * 86400 and config.max_size == 90 * 1024**3
    assert config.tls_cert == Path("/etc/mirror/tls/tls.crt")
    assert config.workers == 2  # not the node's core count: the pod's limits set the budget
    assert config.registries["quay.io"].private == "passthrough"
    assert config.registries["docker.io"].private == "deny"
    assert config.web_ui == "admin"
    assert config.webhooks == (
        WebhookConfig("http://ci.ops/hook"),
        WebhookConfig("https://cd.ops/x", frozenset({"tag.updated"})),
    )


def test_no_secret_without_passwords() -> None:
    objects, _ = render({})
    assert not [o for o in objects if o["kind"] == "Secret"]
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "credentials" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize(
    "values",
    [
        {"service": {"type": "Bogus"}},
        {"replicaCount": -1},
        {"persistence": {"size": 50}},
        {"config": {"tagTTL": "five minutes"}},
        {"registries": {"ghcr.io": {"username": "no-url"}}},
        {"registries": {"Not A Host": {"url": "https://x"}}},
        {"upstream": {"pasword": "typo"}},
        {"service": {"nodePort": 80}},
        {"config": {"workers": 0}},
        {"upstream": {"private": "allow"}},
        {"config": {"webUi": "lan"}},
        {"config": {"webhooks": [{"url": "ftp://x", "events": ["tag.updated"]}]}},
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_dashboard_and_rules_come_from_the_top_level_grafana_files() -> None:
    """One source of truth: the chart's files/ must equal grafana/ (`helm/sync-files` copies)."""
    for name in ("mirror.json", "alerts.yml"):
        assert (CHART / "files" / name).read_bytes() == (ROOT / "grafana" / name).read_bytes(), (
            f"helm/mirror/files/{name} differs from grafana/{name}: run helm/sync-files"
        )
    objects, _ = render(ALL_FEATURES)
    dashboard = one(objects, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["mirror.json"]) == json.loads(
        (ROOT / "grafana" / "mirror.json").read_text()
    )
    rules = one(objects, "PrometheusRule")["spec"]
    assert rules == yaml.safe_load((ROOT / "grafana" / "alerts.yml").read_text())
    monitor = one(objects, "ServiceMonitor")["spec"]
    service = one(objects, "Service", "hub-mirror")
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    steps = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(op, arg) for op, arg in steps]


def test_dockerfile_runs_as_non_root_with_a_data_volume() -> None:
    steps = dockerfile()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    by_op = {op: arg for op, arg in final}
    # Fully qualified, so podman and buildah need no short-name resolution.
    assert by_op["FROM"] == "docker.io/library/python:3.11-slim"
    assert "ARG" not in by_op  # pip's index settings stay in the build stage's history
    assert by_op["USER"].split(":")[0] not in ("0", "root")
    assert json.loads(by_op["VOLUME"]) == ["/var/lib/mirror"]
    argv = json.loads(by_op["ENTRYPOINT"]) + json.loads(by_op["CMD"])
    assert argv[:2] == ["mirror", "serve"]
    args = _parser().parse_args(argv[1:])
    config = config_from_args(args)
    assert config.data_dir == Path("/var/lib/mirror") and config.listen_port == 5000


async def test_dockerfile_healthcheck_passes_against_a_running_mirror(
    hub: FakeHub, tmp_path: Path
) -> None:
    by_op = dict(dockerfile())
    check = json.loads(by_op["HEALTHCHECK"].split("CMD", 1)[1])
    assert check[0] == "python"
    async with mirror_process(tmp_path / "data", hub.registry_url) as mirror:
        admin = mirror.admin.removeprefix("http://")
        command = [sys.executable, *[a.replace("127.0.0.1:5001", admin) for a in check[1:]]]
        await run(*command)
    with pytest.raises(AssertionError):  # and fails when nothing answers
        await run(*command)
