"""The Helm chart, rendered and linted by the real Helm engine, and the Dockerfile (read here;
built and run by tests/e2e/test_container_image.py).

Every rendered manifest is validated against the Kubernetes API schemas; the properties users
rely on (volume at the configured data dir, probes, non-root, secrets kept out of ConfigMaps)
are asserted on the rendered objects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import helm_python
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from prometheus_client import REGISTRY

import mirror.metrics  # noqa: F401  (defines every metric in REGISTRY)
from mirror.cli import _parser, config_from_args
from mirror.clientauth import load_htpasswd
from mirror.config import ANYONE, HostedConfig, S3Config, WebhookConfig, load_config
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.procs import free_port, mirror_process, need, prometheus, run
from tests.integration.test_client_auth import write_htpasswd

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


# The team's own registry beside the cache (README, "Host your own images"): users from an
# htpasswd Secret, hosted namespaces, the org's private Docker Hub and ghcr.io repositories for
# its members (README, "Private repositories").
HOSTED: dict[str, Any] = {
    "auth": {"existingSecret": "mirror-users", "htpasswdKey": "users", "anonymousPull": True},
    "upstream": {"username": "acme", "existingSecret": "hub-token", "private": "members",
                 "members": [{"repository": "acme/secret-*", "users": ["alice"]},
                             {"repository": "acme/*", "users": ["alice", "team-*"]}]},
    "registries": {"ghcr.io": {"url": "https://ghcr.io", "username": "bot",
                               "existingSecret": "ghcr-token", "private": "members"}},
    "hosted": {"acme": {"push": ["alice", "ci-bot"], "immutableTags": True},
               "secret": {"pull": ["alice"]}, "open": {}},
    "hostedMaxSize": "50GiB",
    "config": {"webhooks": [{"url": "http://ci.ops/hook",
                             "events": ["image.pushed", "image.deleted"]}]},
    "tls": {"enabled": True, "secretName": "mirror-tls"},
}  # fmt: skip


def test_hosted_chart_lints_and_every_manifest_validates() -> None:
    report = helm_python.lint(CHART, HOSTED, strict=False)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    objects, notes = render(HOSTED)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert not [o for o in objects if o["kind"] == "Secret"]  # every secret is the user's own
    assert "docker push ADDRESS/acme/IMAGE:TAG   # hosted: acme, open, secret" in notes
    assert "curl -u USER:PASSWORD https://" in notes


def test_hosted_config_is_one_the_mirror_accepts(tmp_path: Path) -> None:
    """The htpasswd file is the user's Secret mounted read-only where auth_htpasswd says; the
    ConfigMap's hosted namespaces and member rules are what the mirror loads, rules in order."""
    objects, _ = render(HOSTED)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "auth"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert mount["readOnly"] is True
    assert volume["secret"] == {"secretName": "mirror-users", "defaultMode": 0o440,
                                "items": [{"key": "users", "path": "htpasswd"}]}  # fmt: skip
    htpasswd = f"{mount['mountPath']}/htpasswd"
    assert mirror_toml(objects)["auth_htpasswd"] == htpasswd
    assert "env" not in container
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/mirror", "/tmp"}

    toml_text = one(objects, "ConfigMap", "hub-mirror")["data"]["mirror.toml"]
    toml_text = toml_text.replace(htpasswd, str(write_htpasswd(tmp_path, alice="wonderland")))
    for registry in ("docker.io", "ghcr.io"):
        (tmp_path / registry).write_text(f"token for {registry}\n")
        toml_text = toml_text.replace(
            f"/etc/mirror/credentials/{registry}", str(tmp_path / registry)
        )
    (tmp_path / "mirror.toml").write_text(toml_text)
    config = load_config({}, {}, str(tmp_path / "mirror.toml"))
    assert config.auth_htpasswd is not None and config.anonymous_pull is True
    assert set(load_htpasswd(config.auth_htpasswd)) == {"alice"}  # as `mirror serve` checks
    assert config.hosted == {
        "acme": HostedConfig("acme", frozenset({"alice", "ci-bot"}), ANYONE, immutable_tags=True),
        "secret": HostedConfig("secret", None, frozenset({"alice"})),
        "open": HostedConfig("open"),
    }
    assert config.hosted_max_size == 50 * 1024**3
    hub, ghcr = config.registries["docker.io"], config.registries["ghcr.io"]
    assert (hub.private, ghcr.private) == ("members", "members")
    # The first matching rule decides, so the chart keeps the values' order.
    assert hub.members == (("acme/secret-*", ("alice",)), ("acme/*", ("alice", "team-*")))
    assert ghcr.members == () and ghcr.password == "token for ghcr.io"
    assert {e for hook in config.webhooks for e in hook.events} == {"image.pushed", "image.deleted"}


def test_without_auth_or_hosted_none_of_it_is_rendered() -> None:
    objects, notes = render({"auth": {"htpasswdKey": "users", "anonymousPull": True}})
    config = mirror_toml(objects)
    assert not {"auth_htpasswd", "anonymous_pull", "hosted", "hosted_max_size"} & set(config)
    assert "members" not in config["registries"]["docker.io"]
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "auth" not in {v["name"] for v in pod["volumes"]}
    assert "Push:" not in notes and "-u USER" not in notes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hosted": {"acme": {}}}, "hosted namespaces need auth.existingSecret"),
        ({**HOSTED, "auth": {"anonymousPull": True}}, "hosted namespaces need auth.existingSecret"),
        ({"upstream": {"username": "acme", "existingSecret": "hub-token", "private": "members"}},
         "upstream.private=members: members are the mirror's users"),
        ({**HOSTED, "registries": {"ghcr.io": {"url": "https://ghcr.io", "private": "members"}}},
         "registries.ghcr.io.private=members: needs the registry's credentials"),
        ({**HOSTED, "registries": {"quay.io": {"url": "https://quay.io",
                                               "private": "passthrough"}}},
         "registries.quay.io.private=passthrough cannot be combined with auth"),
        ({**HOSTED, "replicaCount": 3}, "each replica would keep its own pushes"),
        ({**HOSTED, "upstream": {**HOSTED["upstream"], "members": [
            {"repository": "acme/*", "users": ["alice"]},
            {"repository": "acme/*", "users": ["bob"]}]}},
         "upstream.members: acme/\\* is listed twice"),
    ],
    ids=["hosted-no-auth", "hosted-no-secret", "members-no-auth", "members-no-credentials",
         "passthrough-with-auth", "hosted-replicas-apart", "members-twice"],
)  # fmt: skip
def test_render_fails_where_the_mirror_would_refuse_to_start(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"], ids=["shared-storage", "cluster"])
def test_hosted_replicas_on_shared_storage_all_mount_the_users(kind: str) -> None:
    objects, _ = render({**(CLUSTER if kind == "Deployment" else SHARED_STORAGE), **HOSTED})
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    workload = one(objects, kind)["spec"]
    assert workload["replicas"] == 3
    assert "auth" in {v["name"] for v in workload["template"]["spec"]["volumes"]}
    assert set(mirror_toml(objects)["hosted"]) == {"acme", "secret", "open"}


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"hosted": {"acme": {"pull": "everyone"}}}, "at '/hosted/acme/pull'"),
        ({"hosted": {"acme": {"pull": [""]}}}, "at '/hosted/acme/pull'"),
        ({"hosted": {"acme": {"push": "alice"}}}, "at '/hosted/acme/push'"),
        ({"hosted": {"acme": {"immutable_tags": True}}}, "at '/hosted/acme'"),
        ({"hosted": {"acme": {"immutableTags": "yes"}}}, "at '/hosted/acme/immutableTags'"),
        ({"hosted": {"library": {}}}, "invalid propertyName 'library'"),
        ({"hosted": {"ghcr.io": {}}}, "invalid propertyName 'ghcr[.]io'"),
        ({"hosted": {"Acme": {}}}, "invalid propertyName 'Acme'"),
        ({"hostedMaxSize": "lots"}, "at '/hostedMaxSize'"),
        ({"auth": {"htpasswd": "alice:$2y$..."}}, "at '/auth'"),
        ({"auth": {"anonymousPull": "yes"}}, "at '/auth/anonymousPull'"),
        ({"auth": {"existingSecret": "Mirror Users"}}, "at '/auth/existingSecret'"),
        ({"upstream": {"private": "member"}}, "at '/upstream/private'"),
        ({"upstream": {"members": [{"repository": "acme/*", "users": ["alice"]}]}},
         "at '/upstream/private'"),
        ({"upstream": {"private": "members", "members": {"acme/*": ["alice"]}}},
         "at '/upstream/members'"),
        ({"registries": {"ghcr.io": {"url": "https://ghcr.io", "private": "members",
                                     "members": [{"repository": "acme/*", "users": "alice"}]}}},
         "at '/registries/ghcr.io/members/0/users'"),
        ({"registries": {"ghcr.io": {"url": "https://ghcr.io",
                                     "members": [{"repository": "acme/*", "users": []}]}}},
         "at '/registries/ghcr.io'"),
        ({"config": {"webhooks": [{"url": "http://x", "events": ["image.pulled"]}]}},
         "at '/config/webhooks/0/events/0'"),
    ],
)  # fmt: skip
def test_values_schema_rejects_bad_hosted_and_auth_values(
    values: dict[str, Any], error: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=error):
        render(values)


PG_URL = "postgresql://mirror@postgres.db:5432/mirror"
ROLE_ARN = "arn:aws:iam::123456789012:role/mirror"

# Several replicas on one cache: blobs in a bucket (keys from the team's Secret), the index in
# PostgreSQL (its password from another Secret), a hot tier on each replica's volume.
SHARED_STORAGE: dict[str, Any] = {
    "replicaCount": 3,
    "storage": {"s3": {"enabled": True, "bucket": "team-mirror", "prefix": "cache/",
                       "endpoint": "http://seaweedfs.storage:8333", "region": "eu-west-1",
                       "pathStyle": True, "redirect": True, "existingSecret": "mirror-s3",
                       "accessKeyIdKey": "key-id", "secretAccessKeyKey": "key-secret"}},
    "index": {"postgres": {"enabled": True, "url": PG_URL, "existingSecret": "mirror-pg",
                           "passwordKey": "pg-password"}},
    "localCacheSize": "20GiB",
}  # fmt: skip

# The same on EKS: no keys anywhere, the service account's IAM role (IRSA) instead.
SHARED_STORAGE_IRSA: dict[str, Any] = {
    **SHARED_STORAGE,
    "storage": {"s3": {"enabled": True, "bucket": "team-mirror", "region": "eu-west-1"}},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": ROLE_ARN}},
}


@pytest.mark.parametrize(
    "values", [SHARED_STORAGE, SHARED_STORAGE_IRSA], ids=["secret-keys", "irsa"]
)
def test_shared_storage_chart_lints_and_every_manifest_validates(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=False)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    objects, _ = render(values)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 3
    # The chart creates no Secret: both come from the user's own.
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_shared_storage_config_is_one_the_mirror_accepts(tmp_path: Path) -> None:
    objects, _ = render(SHARED_STORAGE)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The S3 keys reach the AWS client's chain from the environment, as references only.
    assert container["env"] == [
        {"name": "AWS_ACCESS_KEY_ID",
         "valueFrom": {"secretKeyRef": {"name": "mirror-s3", "key": "key-id"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "mirror-s3", "key": "key-secret"}}},
    ]  # fmt: skip
    # The database password is a file from the user's Secret, like the upstream passwords.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "index-password"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "index-password"]
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "mirror-pg"
    assert volume["secret"]["items"] == [{"key": "pg-password", "path": "password"}]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/mirror", "/tmp"}  # staging and the hot tier on the volume

    toml_text = one(objects, "ConfigMap", "hub-mirror")["data"]["mirror.toml"]
    password_file = f"{mount['mountPath']}/password"
    assert mirror_toml(objects)["index_password_file"] == password_file
    (tmp_path / "password").write_text("pg-s3cret\n")
    toml_text = toml_text.replace(password_file, str(tmp_path / "password"))
    (tmp_path / "mirror.toml").write_text(toml_text)
    config = load_config({}, {}, str(tmp_path / "mirror.toml"))
    assert config.s3 == S3Config(
        bucket="team-mirror", prefix="cache/", endpoint="http://seaweedfs.storage:8333",
        region="eu-west-1", path_style=True, redirect=True,
    )  # fmt: skip
    assert config.index_url == PG_URL
    assert config.index_password == "pg-s3cret"
    assert config.local_cache_size == 20 * 1024**3
    assert config.max_size == 45 * 1024**3  # the bucket's cap, the chart's default


def test_shared_storage_without_keys_uses_the_service_accounts_role() -> None:
    objects, _ = render(SHARED_STORAGE_IRSA)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    # No keys in the pod: EKS's webhook adds the role and the web identity token to pods whose
    # service account carries the annotation; the AWS chain picks them up.
    assert "env" not in pod["containers"][0]
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": ROLE_ARN}
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "hub-mirror"
    assert mirror_toml(objects)["storage"] == "s3://team-mirror/"
    # A service account managed elsewhere (e.g. by eksctl) is used by name, not created.
    elsewhere = {"create": False, "name": "mirror-irsa"}
    objects, _ = render({**SHARED_STORAGE_IRSA, "serviceAccount": elsewhere})
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    assert one(objects, "StatefulSet")["spec"]["template"]["spec"]["serviceAccountName"] == (
        "mirror-irsa"
    )


def test_local_storage_writes_no_shared_storage_settings() -> None:
    objects, _ = render({"storage": {"s3": {"bucket": "team-mirror"}}, "localCacheSize": "1GiB"})
    config = mirror_toml(objects)
    assert not {"storage", "index", "local_cache_size", "index_password_file"} & set(config)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "env" not in pod["containers"][0]
    assert "index-password" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"storage": {"s3": {"enabled": True}}}, "/storage/s3/bucket"),
        ({"storage": {"s3": {"enabled": True, "bucket": "Team_Mirror"}}}, "/storage/s3/bucket"),
        ({"storage": {"s3": {"enabled": True, "bucket": "team-mirror", "prefix": "a?b"}}},
         "/storage/s3/prefix"),
        ({"storage": {"s3": {"endpoint": "seaweedfs:8333"}}}, "/storage/s3/endpoint"),
        ({"storage": {"s3": {"pathStyle": "yes"}}}, "/storage/s3/pathStyle"),
        ({"storage": {"s3": {"accessKeyIdKey": ""}}}, "/storage/s3/accessKeyIdKey"),
        ({"storage": {"s3": {"secretKey": "typo"}}}, "/storage/s3"),
        ({"index": {"postgres": {"enabled": True}}}, "/index/postgres/url"),
        ({"index": {"postgres": {"url": "mysql://db/mirror"}}}, "/index/postgres/url"),
        ({"index": {"postgres": {"url": "postgresql://mirror:pw@db/mirror"}}},
         "/index/postgres/url"),
        ({"index": {"postgres": {"url": "postgresql://db/mirror?password=pw"}}},
         "/index/postgres/url"),
        ({"index": {"postgres": {"passwordKey": ""}}}, "/index/postgres/passwordKey"),
        ({"index": {"sqlite": {}}}, "/index"),
        ({"localCacheSize": "lots"}, "/localCacheSize"),
    ],
)  # fmt: skip
def test_values_schema_rejects_bad_shared_storage_values(
    values: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=f"at '{where}'"):
        render(values)


# Cluster mode: the replicas of SHARED_STORAGE as one cache (README, "Running a cluster").
CLUSTER: dict[str, Any] = {
    **{key: value for key, value in SHARED_STORAGE.items() if key != "replicaCount"},
    "localCacheSize": "10GiB",
    "cluster": {"enabled": True, "existingSecret": "mirror-cluster", "secretKey": "token"},
}
# The same scaled by CPU, on a disk of its own per pod, one replica per node at most.
CLUSTER_AUTOSCALED: dict[str, Any] = {
    **CLUSTER,
    "cluster": {
        **CLUSTER["cluster"],
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9,
                        "targetCPUUtilizationPercentage": 60},
        "pdb": {"maxUnavailable": 1},
        "localDisk": {"type": "ephemeral", "size": "40Gi", "storageClass": "fast-ssd"},
        "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"},
    },
}  # fmt: skip
DRAIN = 30  # seconds the mirror lets transfers finish after SIGTERM (app.py, shutdown_timeout)


def kubernetes_env(env: list[dict[str, Any]], pod_ip: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it: the pod's IP from the downward
    API, `$(NAME)` expanded from the variables defined before it (Kubernetes' rule; a later
    or unknown one stays as written). Values from Secrets are left out."""
    resolved: dict[str, str] = {}
    for var in env:
        if "value" in var:
            resolved[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: resolved.get(m.group(1), m.group(0)),
                var["value"],
            )
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            resolved[var["name"]] = pod_ip
    return resolved


@pytest.mark.parametrize("values", [CLUSTER, CLUSTER_AUTOSCALED], ids=["fixed", "autoscaled"])
def test_cluster_chart_lints_and_every_manifest_validates(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=False)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    objects, notes = render(values)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    # A Deployment of interchangeable pods, not the StatefulSet and its governing Service.
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    assert not [o for o in objects if o["metadata"]["name"].endswith("-headless")]
    deployment = one(objects, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    template = deployment["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    autoscaled = values is CLUSTER_AUTOSCALED
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    if autoscaled:
        assert "replicas" not in deployment["spec"]  # the HPA's to set, not each upgrade's
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]
        }  # fmt: skip
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
        assert hpa["spec"]["metrics"] == [
            {"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}
        ]  # fmt: skip
    else:
        assert deployment["spec"]["replicas"] == 3
        assert hpas == []
    budget = one(objects, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"] == selector
    expected_budget = {"maxUnavailable": 1} if autoscaled else {"minAvailable": 1}
    assert {k: v for k, v in budget.items() if k != "selector"} == expected_budget
    # The peers' headless Service: the peer port only, every pod (ready or draining).
    peers = one(objects, "Service", "-peers")["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert peers["selector"] == selector
    assert peers["ports"] == [{"name": "peer", "port": 5002, "targetPort": "peer",
                               "protocol": "TCP"}]  # fmt: skip
    (spread,) = template["spec"]["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule" if autoscaled else "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector},
    }  # fmt: skip
    assert f"exec deploy/{deployment['metadata']['name']} -- mirror stats" in notes


def test_cluster_pods_are_peers_the_mirror_accepts(tmp_path: Path) -> None:
    """What the pod's environment, files and ConfigMap add up to is a cluster-mode Config:
    the peer endpoint on every address, advertised at the pod's IP, with the Secret's key."""
    objects, _ = render(CLUSTER)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = kubernetes_env(container["env"], pod_ip="10.1.2.3")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "cluster-secret"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "cluster-secret"]
    assert mount["readOnly"] is True
    assert volume["secret"] == {"secretName": "mirror-cluster", "defaultMode": 0o440,
                                "items": [{"key": "token", "path": "secret"}]}  # fmt: skip
    secret_file = f"{mount['mountPath']}/secret"
    assert env["MIRROR_CLUSTER_SECRET_FILE"] == secret_file
    assert not {v["name"] for v in container["env"]} & {"MIRROR_CLUSTER_SECRET"}  # no value
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/mirror", "/tmp"}

    (tmp_path / "cluster-secret").write_text("a-shared-secret-of-32-characters\n")
    (tmp_path / "password").write_text("pg-s3cret\n")
    env["MIRROR_CLUSTER_SECRET_FILE"] = str(tmp_path / "cluster-secret")
    toml_text = one(objects, "ConfigMap", "hub-mirror")["data"]["mirror.toml"]
    toml_text = toml_text.replace("/etc/mirror/index/password", str(tmp_path / "password"))
    (tmp_path / "mirror.toml").write_text(toml_text)
    config = load_config({}, env, str(tmp_path / "mirror.toml"))
    assert config.clustered
    assert (config.peer_host, config.peer_port) == ("0.0.0.0", 5002)
    assert config.peer_url == "http://10.1.2.3:5002"
    assert config.cluster_secret == "a-shared-secret-of-32-characters"
    assert config.s3 is not None and config.index_url == PG_URL

    # The peer port is the container's `peer` port, reached through the headless Service and
    # by the release's own pods only; the client-facing Service does not carry it.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"registry": config.listen_port, "peer": config.peer_port}
    assert [p["name"] for p in one(objects, "Service", "hub-mirror")["spec"]["ports"]] == [
        "registry"
    ]
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": selector}
    assert policy["policyTypes"] == ["Ingress"]
    rules = {
        tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policy["ingress"]
    }
    assert rules == {("registry",): None, ("peer",): [{"podSelector": {"matchLabels": selector}}]}


@pytest.mark.parametrize(
    "overrides",
    [{}, {"terminationGracePeriodSeconds": 90, "cluster": {"preStopSleepSeconds": 20}}],
    ids=["defaults", "longer-pause"],
)
def test_cluster_pods_leave_the_service_then_drain_within_the_grace_period(
    overrides: dict[str, Any],
) -> None:
    """A rolling upgrade fails no pull: the pod keeps serving during the preStop pause (the
    endpoints forget it meanwhile), then SIGTERM drains transfers for up to DRAIN seconds, all
    within the grace period; readiness keeps new clients away from a pod that cannot serve."""
    values = {**CLUSTER, **overrides,
              "cluster": {**CLUSTER["cluster"], **overrides.get("cluster", {})}}  # fmt: skip
    objects, _ = render(values)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert pause == overrides.get("cluster", {}).get("preStopSleepSeconds", 5)
    assert pod["terminationGracePeriodSeconds"] >= pause + DRAIN
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_cluster_pods_stage_on_a_disk_of_their_own() -> None:
    """No claim outlives a pod: staging and the hot tier are an emptyDir with a cap, or an
    ephemeral volume made for the pod and deleted with it."""
    for values, expected in (
        (CLUSTER, {"emptyDir": {"sizeLimit": "20Gi"}}),
        (CLUSTER_AUTOSCALED, {"ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": {"app.kubernetes.io/name": "mirror",
                                    "app.kubernetes.io/instance": "hub"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                     "resources": {"requests": {"storage": "40Gi"}}}}}}),
    ):  # fmt: skip
        objects, _ = render(values)
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        data = mirror_toml(objects)["data"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == data]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert {k: v for k, v in volume.items() if k != "name"} == expected
        assert mirror_toml(objects)["local_cache_size"] == "10GiB"


def test_without_cluster_mode_nothing_of_it_is_rendered() -> None:
    cluster_only = {"Deployment", "HorizontalPodAutoscaler", "NetworkPolicy"}
    for values in ({}, ALL_FEATURES, {**SHARED_STORAGE, "cluster": {"existingSecret": "x"}}):
        objects, _ = render(values)
        assert not {o["kind"] for o in objects} & cluster_only
        assert not [o for o in objects if o["metadata"]["name"].endswith("-peers")]
        container = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        assert not [v for v in container.get("env", []) if v["name"].startswith("MIRROR_")]
        assert [p["name"] for p in container["ports"]] == ["registry"]
        assert "lifecycle" not in container


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"cluster": {"enabled": True, "existingSecret": "mirror-cluster"}},
         "/storage/s3/enabled"),
        ({**CLUSTER, "storage": {"s3": {"enabled": False}}}, "/storage/s3/enabled"),
        ({**CLUSTER, "index": {"postgres": {"enabled": False}}}, "/index/postgres/enabled"),
        ({**CLUSTER, "cluster": {"enabled": True}}, "/cluster/existingSecret"),
        ({**CLUSTER, "cluster": {**CLUSTER["cluster"], "localDisk": {"type": "hostPath"}}},
         "/cluster/localDisk/type"),
        ({**CLUSTER, "cluster": {**CLUSTER["cluster"],
                                 "topologySpread": {"whenUnsatisfiable": "Never"}}},
         "/cluster/topologySpread/whenUnsatisfiable"),
        ({**CLUSTER, "cluster": {**CLUSTER["cluster"],
                                 "autoscaling": {"targetCPUUtilizationPercentage": 0}}},
         "/cluster/autoscaling/targetCPUUtilizationPercentage"),
        ({**CLUSTER, "cluster": {**CLUSTER["cluster"], "peerPort": 0}}, "/cluster/peerPort"),
        ({**CLUSTER, "cluster": {**CLUSTER["cluster"], "replica": 3}}, "/cluster"),
    ],
)  # fmt: skip
def test_values_schema_rejects_bad_cluster_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=f"at '{where}'"):
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


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_shared_storage_helm_command_deploys_the_readme_config() -> None:
    """The section's `helm install` renders, validates, and configures what its TOML does."""
    section = readme_section("When one machine is not enough")
    command = re.search(r"```sh\n(helm install .*?)```", section, re.S)
    assert command is not None
    values = helm_python.parse_set_string(
        ",".join(re.findall(r"--set (\S+)", command.group(1).replace("\\\n", " ")))
    )
    objects, _ = render(values)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 3
    toml_block = re.search(
        r"<!-- tested: shared storage example -->\n```toml\n(.*?)```", section, re.S
    )
    assert toml_block is not None
    readme = tomllib.loads(toml_block.group(1))
    chart = mirror_toml(objects)
    keys = ("storage", "s3_endpoint", "s3_region", "s3_path_style", "max_size", "index")
    assert {k: chart[k] for k in keys} == {k: readme[k] for k in keys}
    assert chart["local_cache_size"] == readme["local_cache_size"]


def test_readme_cluster_helm_command_deploys_a_cluster() -> None:
    """The "Running a cluster" section's `helm install` renders and validates as cluster mode,
    with the secret its `kubectl create secret` makes under the chart's default key."""
    section = readme_section("Running a cluster")
    secret = re.search(r"kubectl .*create secret generic (\S+) --from-literal=(\w+)=", section)
    command = re.search(r"```sh\n.*?(helm install .*?)```", section, re.S)
    assert secret is not None and command is not None
    values = helm_python.parse_set_string(
        ",".join(re.findall(r"--set (\S+)", command.group(1).replace("\\\n", " ")))
    )
    objects, _ = render(values)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "cluster-secret"]
    assert volume["secret"]["secretName"] == secret.group(1)
    assert volume["secret"]["items"][0]["key"] == secret.group(2)
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["emptyDir"]["sizeLimit"] == "60Gi"
    assert mirror_toml(objects)["local_cache_size"] == "40GiB"


SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def test_dashboard_and_rules_query_only_metrics_the_mirror_defines() -> None:
    """A misspelt name is no error to Prometheus, only a panel or an alert that stays empty."""
    defined = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("mirror_")
        for suffix in SERIES[family.type]
    }
    dashboard = json.loads((ROOT / "grafana" / "mirror.json").read_text())
    rules = yaml.safe_load((ROOT / "grafana" / "alerts.yml").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        r["expr"] for g in rules["groups"] for r in g["rules"]
    ]
    used = {name for expr in exprs for name in re.findall(r"\bmirror_[a-z_]+", expr)}
    assert used - defined == set()
    backend = {"mirror_backend_duration_seconds_bucket", "mirror_backend_errors_total"}
    assert backend | {"mirror_backend_up"} <= used
    hosted = {name for name in defined if name.startswith("mirror_hosted_")}
    assert len(hosted) == 7 and hosted <= used  # every hosted metric has its panel


@contextlib.asynccontextmanager
async def exporters(pages: list[Callable[[float], str]]) -> AsyncIterator[list[str]]:
    """One /metrics endpoint per page (host:port each): a page is a function of the seconds
    since start, so counters grow at known rates and gauges hold known values."""
    start = time.monotonic()
    runners: list[web.AppRunner] = []
    addresses: list[str] = []
    try:
        for page in pages:

            async def metrics(
                _request: web.Request, page: Callable[[float], str] = page
            ) -> web.Response:
                return web.Response(text=page(time.monotonic() - start))

            app = web.Application()
            app.router.add_get("/metrics", metrics)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            addresses.append(f"127.0.0.1:{port}")
        yield addresses
    finally:
        for runner in runners:
            await runner.cleanup()


def replica_page(
    cache_bytes: int, cap: int, blobs: int, shared_index: bool
) -> Callable[[float], str]:
    """A replica's metrics: each second 300 B served from the cache, 100 B from upstream and
    (shared index: cluster mode) 200 B streamed to other replicas."""

    def page(elapsed: float) -> str:
        served = {"cache": 300 * elapsed, "upstream": 100 * elapsed}
        if shared_index:
            served["peer"] = 200 * elapsed
        lines = [
            'mirror_build_info{version="0.1.0"} 1',
            f"mirror_cache_bytes {cache_bytes}",
            f"mirror_cache_max_bytes {cap}",
            f"mirror_cache_blobs {blobs}",
            f"mirror_cache_manifests {blobs // 2}",
            *(f'mirror_served_bytes_total{{source="{k}"}} {v}' for k, v in served.items()),
            'mirror_backend_up{backend="%s"} 1' % ("postgresql" if shared_index else "sqlite"),
        ]
        return "\n".join(lines) + "\n"

    return page


async def test_dashboard_cluster_totals_count_a_shared_cache_once(tmp_path: Path) -> None:
    """Against a real Prometheus: three replicas on one shared index each report the whole
    cache (one of them a little behind), two mirrors with caches of their own report theirs.
    The dashboard's totals show the shared cache once, the separate ones added up, and leave
    bytes sent between replicas out of the hit ratio. (The metrics come from small exporters
    with known values: the cluster itself is tests/integration/test_cluster.py's.)"""
    need("prometheus")
    pages = [
        replica_page(6000, 10_000, 40, shared_index=True),
        replica_page(6000, 10_000, 40, shared_index=True),
        replica_page(5990, 10_000, 39, shared_index=True),
        replica_page(1000, 2000, 10, shared_index=False),
        replica_page(500, 2000, 6, shared_index=False),
    ]
    panels = {
        (p["title"], t["refId"]): t["expr"]
        for p in json.loads((ROOT / "grafana" / "mirror.json").read_text())["panels"]
        for t in p.get("targets", [])  # a row has none
    }
    async with exporters(pages) as targets, prometheus(tmp_path / "prom", targets) as prom:
        cluster, separate = "|".join(targets[:3]), "|".join(targets[3:])
        async with aiohttp.ClientSession() as http:

            async def raw(expr: str) -> dict[str, float]:
                async with http.get(f"{prom.url}/api/v1/query", params={"query": expr}) as r:
                    answer = await r.json()
                assert answer["status"] == "success", answer
                return {
                    s["metric"].get("instance", ""): float(s["value"][1])
                    for s in answer["data"]["result"]
                }

            async def query(panel: str, ref: str, instances: str) -> dict[str, float]:
                return await raw(
                    panels[(panel, ref)].replace("$__rate_interval", "5s")
                    .replace('instance=~"$instance"', f'instance=~"{instances}"')
                )  # fmt: skip

            async with asyncio.timeout(60):  # until every target was scraped 6 times (1 s apart)
                while True:
                    scraped = await raw("count_over_time(mirror_build_info[5m])")
                    if len(scraped) == len(targets) and min(scraped.values()) >= 6:
                        break
                    await asyncio.sleep(0.5)

            assert await query("Cache size vs cap", "A", cluster) == {"": 6000}
            assert await query("Cache size vs cap", "B", cluster) == {"": 10_000}
            assert await query("Cached objects", "A", cluster) == {"": 40}
            assert await query("Cache size vs cap", "A", separate) == {"": 1500}
            assert await query("Cache size vs cap", "B", separate) == {"": 4000}
            assert await query("Cached objects", "B", separate) == {"": 5 + 3}
            (ratio,) = (await query("Cache hit ratio (bytes)", "A", cluster)).values()
            assert ratio == pytest.approx(0.75, abs=0.01)  # 300 / (300 + 100); peer bytes out
            peer = await query("Peer traffic per replica", "A", f"{cluster}|{separate}")
            assert set(peer) == set(targets)
            assert [peer[t] for t in targets[3:]] == [0, 0]  # no peer endpoint: 0, not missing
            for target in targets[:3]:
                assert peer[target] == pytest.approx(200, rel=0.1)


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
