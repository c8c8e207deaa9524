"""One frozen, typed Config, built once at start: flags > environment > TOML file > defaults.

No other module reads the environment; everything it needs is passed in from here.
"""

from __future__ import annotations

import configparser
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.cpus import cgroup_cpu_limit, default_workers
from mirror.reference import DOCKER_HUB, HOSTED, NAME_COMPONENT_RE, looks_like_registry_host

DEFAULT_LISTEN = "0.0.0.0:5000"
DEFAULT_DATA = "./mirror-data"
DEFAULT_UPSTREAM = "https://registry-1.docker.io"
DEFAULT_TAG_TTL = 300.0
DEFAULT_NEGATIVE_TTL = 30.0
DEFAULT_MAX_SIZE = "20GiB"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:5001"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting."""


WEB_UI_PLACES = ("registry", "admin", "off")
WEBHOOK_EVENTS = (
    "image.cached", "tag.updated", "blob.evicted", "upstream.error", "image.pushed",
    "image.deleted",
)  # fmt: skip


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int, setting: str = "duration") -> float:
    """Seconds from `300`, `90s`, `5m`, `1h`, `7d`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION_RE.fullmatch(str(value))
        if not match:
            raise ConfigError(f"{setting}: {value!r} is not a duration (e.g. 300, 90s, 5m, 1h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ConfigError(f"{setting}: must not be negative")
    return seconds


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(value: str | int, setting: str = "size") -> int:
    """Bytes from `1048576`, `500MiB`, `50GiB`, `2GB` (binary with `i`, decimal without)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.fullmatch(str(value))
    if not match:
        raise ConfigError(f"{setting}: {value!r} is not a size (e.g. 500MiB, 50GiB)")
    unit = (match.group(2) or "").lower().rstrip("b")
    binary = unit.endswith("i")
    factor = 1024 ** ("kmgt".index(unit[0]) + 1) if binary else _SIZE_UNITS[unit]
    return int(float(match.group(1)) * factor)


def parse_listen(value: str, setting: str = "listen") -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` (all interfaces) or `[v6]:PORT`."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{setting}: {value!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_upstream_url(value: str, setting: str = "upstream") -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{setting}: {value!r} must be an http:// or https:// URL")
    return value.rstrip("/")


@dataclass(frozen=True)
class RegistryConfig:
    """One upstream registry the mirror stands in for."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed
    tag_ttl: float = DEFAULT_TAG_TTL
    token_realms: tuple[str, ...] = ()  # extra hosts allowed to receive the credentials
    # Content anonymous clients could not pull upstream: "deny" it, serve it to clients whose
    # own credentials the upstream accepts ("passthrough"), or to the mirror's own users
    # ("members"), as `members` allows. See visibility.py.
    private: str = "deny"
    # With private = "members": (repository pattern, user patterns) in the file's order; a
    # private repository matching a pattern goes to its users only, one matching none to
    # every mirror user. Patterns: fnmatch (`acme/*`, `team-*`).
    members: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username and self.password is not None:
            return self.username, self.password
        return None


ANYONE = "anyone"


@dataclass(frozen=True)
class HostedConfig:
    """One namespace of the team's own repositories (`[hosted."acme"]`): pushed to and served
    by the mirror, never fetched upstream (hosted/). `push`: the mirror users who may push
    there, None for every user; `pull`: "anyone" (whoever may use the mirror), or users."""

    name: str
    push: frozenset[str] | None = None
    pull: frozenset[str] | str = ANYONE
    immutable_tags: bool = False  # a pushed tag never moves to another digest (nor is deleted)

    def may_push(self, user: str) -> bool:
        return self.push is None or user in self.push

    def may_pull(self, user: str | None) -> bool:
        return self.pull == ANYONE or (user is not None and user in self.pull)


@dataclass(frozen=True)
class WebhookConfig:
    """One receiver of event notifications (webhooks.py)."""

    url: str
    events: frozenset[str] = frozenset(WEBHOOK_EVENTS)
    secret: str | None = field(default=None, repr=False)  # signs bodies (HMAC-SHA256)


@dataclass(frozen=True)
class S3Config:
    """`storage = "s3://bucket/prefix"` and its settings: blobs and manifests in a bucket.

    Without keys here, the library's standard AWS chain finds credentials (AWS_ACCESS_KEY_ID
    and friends, the shared credentials file, EKS web identity, instance roles)."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None  # e.g. http://minio:9000; None: AWS for the region
    region: str | None = None
    path_style: bool = False  # http://host/bucket/key rather than http://bucket.host/key
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)  # never printed
    redirect: bool = False  # answer warm blob GETs with a 307 to a presigned URL


@dataclass(frozen=True)
class Config:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    data_dir: Path = Path(DEFAULT_DATA)
    registries: Mapping[str, RegistryConfig] = field(
        default_factory=lambda: {DOCKER_HUB: RegistryConfig(DOCKER_HUB, DEFAULT_UPSTREAM)}
    )
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    max_size: int = 20 * 1024**3
    max_age: float | None = None  # expire content unused this long; None: only the cap evicts
    admin_host: str = "127.0.0.1"
    admin_port: int = 5001
    tls_cert: Path | None = None  # PEM chain; with tls_key, the registry listener speaks https
    tls_key: Path | None = None
    workers: int = 1  # processes serving the listen address (load_config: see cpus.py)
    auth_htpasswd: Path | None = None  # clients of the mirror itself must log in (clientauth.py)
    anonymous_pull: bool = False  # with auth_htpasswd: clients without credentials may still pull
    max_upstream_fetches: int = 32  # blob downloads at once per registry and worker; FIFO beyond
    upstream_read_timeout: float = 30.0  # a silent upstream is dropped and resumed after this
    # The web page: on the registry listener (read-only; pin/purge buttons on the admin one),
    # only on the admin listener, or nowhere.
    web_ui: str = "registry"
    webhooks: tuple[WebhookConfig, ...] = ()
    s3: S3Config | None = None  # None: blobs as files under data_dir (store/blobs/local.py)
    # None: SQLite in data_dir; else a postgresql:// URL (store/index/postgres.py). The URL may
    # hold a password: never printed (see index_label).
    index_url: str | None = field(default=None, repr=False)
    index_password: str | None = field(default=None, repr=False)
    local_cache_size: int = 10 * 1024**3  # with s3: the hot tier of blobs kept on local disk
    # Cluster mode (cluster/): the peer endpoint's address, the URL other replicas reach it
    # by, and the secret they share. None: a replica on its own.
    peer_host: str | None = None
    peer_port: int | None = None
    peer_url: str | None = None
    cluster_secret: str | None = field(default=None, repr=False)
    hosted: Mapping[str, HostedConfig] = field(default_factory=dict)  # by namespace
    hosted_max_size: int = 10 * 1024**3  # the quota of all hosted content together

    @property
    def hosted_names(self) -> frozenset[str]:
        return frozenset(self.hosted)

    @property
    def clustered(self) -> bool:
        return self.peer_port is not None

    @property
    def index_label(self) -> str:
        """The index as logs and pages may show it: engine, host and database, no secret."""
        if self.index_url is None:
            return f"sqlite:{self.data_dir / 'index.db'}"
        parts = urlsplit(self.index_url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"postgresql://{host}{port}{parts.path}"

    @property
    def registry_names(self) -> frozenset[str]:
        return frozenset(self.registries)


# setting name -> (environment variable, TOML key)
_SOURCES = {
    "listen": ("MIRROR_LISTEN", "listen"),
    "data": ("MIRROR_DATA", "data"),
    "upstream": ("MIRROR_UPSTREAM", "upstream"),
    "upstream_username": ("MIRROR_UPSTREAM_USERNAME", "upstream_username"),
    "upstream_password_file": (None, "upstream_password_file"),
    "tag_ttl": ("MIRROR_TAG_TTL", "tag_ttl"),
    "token_realms": ("MIRROR_TOKEN_REALMS", "token_realms"),
    "negative_ttl": ("MIRROR_NEGATIVE_TTL", "negative_ttl"),
    "max_size": ("MIRROR_MAX_SIZE", "max_size"),
    "max_age": ("MIRROR_MAX_AGE", "max_age"),
    "admin_listen": ("MIRROR_ADMIN_LISTEN", "admin_listen"),
    "tls_cert": ("MIRROR_TLS_CERT", "tls_cert"),
    "tls_key": ("MIRROR_TLS_KEY", "tls_key"),
    "workers": ("MIRROR_WORKERS", "workers"),
    "auth_htpasswd": ("MIRROR_AUTH_HTPASSWD", "auth_htpasswd"),
    "anonymous_pull": ("MIRROR_ANONYMOUS_PULL", "anonymous_pull"),
    "max_upstream_fetches": ("MIRROR_MAX_UPSTREAM_FETCHES", "max_upstream_fetches"),
    "upstream_read_timeout": ("MIRROR_UPSTREAM_READ_TIMEOUT", "upstream_read_timeout"),
    "web_ui": ("MIRROR_WEB_UI", "web_ui"),
    "webhooks": ("MIRROR_WEBHOOKS", "webhooks"),
    "storage": ("MIRROR_STORAGE", "storage"),
    "s3_endpoint": ("MIRROR_S3_ENDPOINT", "s3_endpoint"),
    "s3_region": ("MIRROR_S3_REGION", "s3_region"),
    "s3_path_style": ("MIRROR_S3_PATH_STYLE", "s3_path_style"),
    "s3_credentials_file": ("MIRROR_S3_CREDENTIALS_FILE", "s3_credentials_file"),
    "s3_redirect": ("MIRROR_S3_REDIRECT", "s3_redirect"),
    "index": ("MIRROR_INDEX", "index"),
    "index_password_file": ("MIRROR_INDEX_PASSWORD_FILE", "index_password_file"),
    "local_cache_size": ("MIRROR_LOCAL_CACHE_SIZE", "local_cache_size"),
    "peer_listen": ("MIRROR_PEER_LISTEN", "peer_listen"),
    "peer_url": ("MIRROR_PEER_URL", "peer_url"),
    "cluster_secret_file": ("MIRROR_CLUSTER_SECRET_FILE", "cluster_secret_file"),
    "hosted": ("MIRROR_HOSTED", "hosted"),
    "hosted_max_size": ("MIRROR_HOSTED_MAX_SIZE", "hosted_max_size"),
}
_DEFAULTS: dict[str, Any] = {
    "listen": DEFAULT_LISTEN,
    "data": DEFAULT_DATA,
    "upstream": DEFAULT_UPSTREAM,
    "upstream_username": None,
    "upstream_password_file": None,
    "tag_ttl": DEFAULT_TAG_TTL,
    "token_realms": (),
    "negative_ttl": DEFAULT_NEGATIVE_TTL,
    "max_size": DEFAULT_MAX_SIZE,
    "max_age": None,
    "admin_listen": DEFAULT_ADMIN_LISTEN,
    "tls_cert": None,
    "tls_key": None,
    "workers": None,  # the cores this process may use, at most 8 (cpus.py)
    "auth_htpasswd": None,
    "anonymous_pull": False,
    "max_upstream_fetches": 32,
    "upstream_read_timeout": 30.0,
    "web_ui": "registry",
    "webhooks": (),
    "storage": "local",
    "s3_endpoint": None,
    "s3_region": None,
    "s3_path_style": False,
    "s3_credentials_file": None,
    "s3_redirect": False,
    "index": "sqlite",
    "index_password_file": None,
    "local_cache_size": "10GiB",
    "peer_listen": None,
    "peer_url": None,
    "cluster_secret_file": None,
    "hosted": (),
    "hosted_max_size": "10GiB",
}


def parse_hosts(
    value: str | list[str] | tuple[str, ...], setting: str = "token_realms"
) -> tuple[str, ...]:
    """Host names from a list or a comma-separated string; a URL stands for its host."""
    items = value.split(",") if isinstance(value, str) else list(value)
    hosts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{setting}: {item!r} is not a host name")
        item = item.strip()
        if not item:
            continue
        host = urlsplit(item).hostname if "://" in item else item.split(":")[0]
        if not host:
            raise ConfigError(f"{setting}: {item!r} is not a host name")
        hosts.append(host.lower())
    return tuple(hosts)


_REGISTRY_KEYS = {
    "url", "username", "password_file", "password_env", "tag_ttl", "token_realms", "private",
    "members",
}  # fmt: skip
PRIVATE_POLICIES = ("deny", "passthrough", "members")


def _private_policy(value: object, setting: str) -> str:
    if value not in PRIVATE_POLICIES:
        raise ConfigError(f'{setting}: {value!r} must be "deny", "passthrough" or "members"')
    return str(value)


def parse_members(table: object, setting: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`members = {"acme/*" = ["alice", "team-*"]}`: repository pattern -> user patterns."""
    if not isinstance(table, dict):
        raise ConfigError(f'{setting}: a table of repository patterns, e.g. "acme/*" = ["alice"]')
    rules: list[tuple[str, tuple[str, ...]]] = []
    for pattern, users in table.items():
        rules.append((pattern, tuple(sorted(_users(users, f'{setting}."{pattern}"')))))
    return tuple(rules)


def _members_policy(table: Mapping[str, Any], setting: str) -> dict[str, Any]:
    private = _private_policy(table.get("private", "deny"), f"{setting}.private")
    if "members" in table and private != "members":
        raise ConfigError(f'{setting}.members: only with private = "members"')
    return {
        "private": private,
        "members": parse_members(table.get("members", {}), f"{setting}.members"),
    }


_HOSTED_KEYS = {"push", "pull", "immutable_tags"}


def _users(value: object, setting: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(u, str) and u for u in value):
        raise ConfigError(f"{setting}: a list of mirror user names")
    return frozenset(value)


def parse_hosted(names: object, tables: object) -> dict[str, HostedConfig]:
    """Hosted namespaces: the names a flag or the environment gives (a list, or
    comma-separated), and every `[hosted."name"]` table of the file, whose `push` and `pull`
    rules apply to that name wherever it was named. Union, not precedence: a flag naming
    one more namespace must not silently drop the file's."""
    if not isinstance(tables, dict):
        raise ConfigError('hosted: must be tables, e.g. [hosted."acme"]')
    listed = names.split(",") if isinstance(names, str) else list(names or ())  # type: ignore[call-overload]
    hosted: dict[str, HostedConfig] = {}
    for name in [str(n).strip() for n in listed] + list(tables):
        if not name or name in hosted:
            continue
        setting = f'hosted."{name}"'
        if not NAME_COMPONENT_RE.fullmatch(name) or looks_like_registry_host(name):
            # A name with a dot is a registry host to every client (ghcr.io/owner/app).
            raise ConfigError(
                f"{setting}: a namespace is one path component without a dot, e.g. acme"
            )
        if name == "library":
            # Docker Hub's official images: a client asking for `alpine` means library/alpine.
            raise ConfigError(f"{setting}: library is Docker Hub's official images")
        table = tables.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{setting}: must be a table")
        unknown = set(table) - _HOSTED_KEYS
        if unknown:
            raise ConfigError(f"{setting}: unknown key(s): {', '.join(sorted(unknown))}")
        push = _users(table["push"], f"{setting}.push") if "push" in table else None
        pull = table.get("pull", ANYONE)
        hosted[name] = HostedConfig(
            name,
            push,
            pull if pull == ANYONE else _users(pull, f'{setting}.pull (or "anyone")'),
            parse_bool(table.get("immutable_tags", False), f"{setting}.immutable_tags"),
        )
    return hosted


_REGISTRY_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?$")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
    unknown = set(data) - {toml_key for _env, toml_key in _SOURCES.values()} - {"registries"}
    if unknown:
        raise ConfigError(f"config: unknown key(s) in {path}: {', '.join(sorted(unknown))}")
    return data


def _check_table(name: str, table: object) -> dict[str, Any]:
    """A `[registries."name"]` value must be a table of known keys."""
    if not isinstance(table, dict):
        raise ConfigError(f'registries."{name}": must be a table')
    unknown = set(table) - _REGISTRY_KEYS
    if unknown:
        raise ConfigError(f'registries."{name}": unknown key(s): {", ".join(sorted(unknown))}')
    return table


def _registry_table(name: str, table: object, env: Mapping[str, str]) -> RegistryConfig:
    """One `[registries."host"]` table: url, credentials (file or env), tag_ttl, token_realms."""
    setting = f'registries."{name}"'
    if not _REGISTRY_NAME.fullmatch(name):
        raise ConfigError(f"{setting}: a registry is named by its host, e.g. ghcr.io")
    if name == HOSTED:
        raise ConfigError(f"{setting}: {HOSTED} is the name the index keeps hosted content under")
    table = _check_table(name, table)
    password = None
    if table.get("password_file"):
        password = _read_secret_file(str(table["password_file"]))
    elif table.get("password_env"):
        password = env.get(str(table["password_env"]))
        if password is None:
            raise ConfigError(f"{setting}: environment variable {table['password_env']} is not set")
    return RegistryConfig(
        name=name,
        url=parse_upstream_url(str(table.get("url", f"https://{name}")), f"{setting}.url"),
        username=table.get("username"),
        password=password,
        tag_ttl=parse_duration(table.get("tag_ttl", DEFAULT_TAG_TTL), f"{setting}.tag_ttl"),
        token_realms=parse_hosts(table.get("token_realms", ()), f"{setting}.token_realms"),
        **_members_policy(table, setting),
    )


def _read_secret_file(path: str, setting: str = "upstream_password_file") -> str:
    try:
        return Path(path).read_text().strip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc


_WEBHOOK_KEYS = {"url", "events", "secret_file"}


def parse_webhooks(value: object) -> tuple[WebhookConfig, ...]:
    """URLs (a list, or comma-separated from a flag or the environment), or TOML tables
    `{url, events, secret_file}` to choose events and sign the bodies."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError("webhooks: a list of URLs or of tables with a url")
    hooks: list[WebhookConfig] = []
    for n, item in enumerate(items):
        setting = f"webhooks[{n}]"
        table: dict[str, Any] = {"url": item} if isinstance(item, str) else item
        if not isinstance(table, dict) or not isinstance(table.get("url"), str):
            raise ConfigError(f"{setting}: a URL, or a table with a url")
        unknown = set(table) - _WEBHOOK_KEYS
        if unknown:
            raise ConfigError(f"{setting}: unknown key(s): {', '.join(sorted(unknown))}")
        url = table["url"].strip()
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{setting}: {url!r} must be an http(s) URL")
        events = table.get("events", list(WEBHOOK_EVENTS))
        if not isinstance(events, list) or not set(events) <= set(WEBHOOK_EVENTS) or not events:
            raise ConfigError(f"{setting}.events: some of {', '.join(WEBHOOK_EVENTS)}")
        secret_file = table.get("secret_file")
        secret = (
            _read_secret_file(str(secret_file), f"{setting}.secret_file") if secret_file else None
        )
        hooks.append(WebhookConfig(url, frozenset(events), secret))
    return tuple(hooks)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value: object, setting: str) -> bool:
    """A TOML boolean, or true/false (1/0, yes/no, on/off) from a flag or the environment."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{setting}: {value!r} must be true or false")


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _s3_credentials(path: str) -> tuple[str, str]:
    """The keys of an AWS shared-credentials file (its `[default]` profile, or its only one):
    the format `aws configure` writes and a Kubernetes Secret mounts as is."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"s3_credentials_file: cannot read {path}: {exc.strerror}") from exc
    except configparser.Error:
        raise ConfigError(f"s3_credentials_file: {path} is not an AWS credentials file") from None
    sections = parser.sections()
    section = "default" if "default" in sections else sections[0] if len(sections) == 1 else None
    if section is None:
        raise ConfigError(f"s3_credentials_file: {path} needs a [default] profile")
    key = parser.get(section, "aws_access_key_id", fallback="").strip()
    secret = parser.get(section, "aws_secret_access_key", fallback="").strip()
    if not key or not secret:
        raise ConfigError(
            f"s3_credentials_file: {path} needs aws_access_key_id and aws_secret_access_key"
        )
    return key, secret


def parse_storage(
    storage: object,
    endpoint: object,
    region: object,
    path_style: object,
    credentials_file: object,
    redirect: object,
) -> S3Config | None:
    """`local` (files under the data directory) or `s3://bucket/prefix` with its settings."""
    value = str(storage).strip()
    if value in ("", "local"):
        return None
    parts = urlsplit(value)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f'storage: {value!r} must be "local" or s3://bucket/prefix')
    if not _BUCKET.fullmatch(parts.netloc):
        raise ConfigError(f"storage: {parts.netloc!r} is not an S3 bucket name")
    prefix = parts.path.strip("/")
    if endpoint is not None:
        endpoint = parse_upstream_url(str(endpoint), "s3_endpoint")
    access_key = secret_key = None
    if credentials_file:
        access_key, secret_key = _s3_credentials(str(credentials_file))
    return S3Config(
        bucket=parts.netloc,
        prefix=f"{prefix}/" if prefix else "",
        endpoint=endpoint,
        region=str(region) if region else None,
        path_style=parse_bool(path_style, "s3_path_style"),
        access_key=access_key,
        secret_key=secret_key,
        redirect=parse_bool(redirect, "s3_redirect"),
    )


def parse_index(value: object) -> str | None:
    """`sqlite` (a file in the data directory) or a `postgresql://` URL."""
    text = str(value).strip()
    if text in ("", "sqlite"):
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or parts.query):
        raise ConfigError('index: must be "sqlite" or a postgresql://user@host/database URL')
    return text


def parse_peer(
    listen: object, url: object, secret_file: object, env: Mapping[str, str]
) -> dict[str, Any]:
    """Cluster mode's settings: `peer_listen` (HOST:PORT), `peer_url` (how the other
    replicas reach it; default http://HOST:PORT, which needs a HOST other than 0.0.0.0) and the
    shared secret (`cluster_secret_file`, or MIRROR_CLUSTER_SECRET), as Config fields."""
    if not listen:
        if url:
            raise ConfigError("peer_url: needs peer_listen")
        return {}
    host, port = parse_listen(str(listen), "peer_listen")
    if url:
        advertised = parse_upstream_url(str(url), "peer_url")
    elif host in ("0.0.0.0", "::"):
        raise ConfigError(
            "peer_url: say how other replicas reach this one, e.g. http://10.0.0.5:5002"
        )
    else:
        advertised = f"http://{host}:{port}"
    if secret_file:
        secret = _read_secret_file(str(secret_file), "cluster_secret_file")
    else:
        secret = env.get("MIRROR_CLUSTER_SECRET", "")
    if len(secret) < 16:
        raise ConfigError(
            "cluster_secret_file: a shared secret of at least 16 characters is required in "
            "cluster mode (or MIRROR_CLUSTER_SECRET)"
        )
    return {"peer_host": host, "peer_port": port, "peer_url": advertised, "cluster_secret": secret}


def load_config(
    flags: Mapping[str, Any], env: Mapping[str, str], config_file: str | None = None
) -> Config:
    """Merge the sources; `flags` holds only the flags the user gave (None means not given)."""
    file_values = _read_toml(Path(config_file)) if config_file else {}
    tables = file_values.get("registries", {})
    if not isinstance(tables, dict):
        raise ConfigError('registries: must be tables, e.g. [registries."ghcr.io"]')
    # A [registries."docker.io"] table is the file-level source of the docker.io settings.
    hub_table = _check_table(DOCKER_HUB, tables.get(DOCKER_HUB, {}))
    if hub_table:
        for key, top in (("url", "upstream"), ("username", "upstream_username"),
                         ("password_file", "upstream_password_file"), ("tag_ttl", "tag_ttl"),
                         ("token_realms", "token_realms")):  # fmt: skip
            if key in hub_table and top not in file_values:
                file_values[top] = hub_table[key]

    def pick(name: str) -> Any:
        env_var, toml_key = _SOURCES[name]
        if flags.get(name) is not None:
            return flags[name]
        if env_var and env.get(env_var):
            return env[env_var]
        if toml_key in file_values:
            return file_values[toml_key]
        return _DEFAULTS[name]

    host, port = parse_listen(str(pick("listen")))
    admin_host, admin_port = parse_listen(str(pick("admin_listen")), "admin_listen")
    max_size = parse_size(pick("max_size"), "max_size")
    if max_size <= 0:
        raise ConfigError("max_size: must be positive")
    max_age = pick("max_age")
    password: str | None = None
    # A password given directly in the environment outranks the file only when no flag names a file.
    password_file = flags.get("upstream_password_file")
    if password_file:
        password = _read_secret_file(password_file)
    elif env.get("MIRROR_UPSTREAM_PASSWORD"):
        password = env["MIRROR_UPSTREAM_PASSWORD"]
    elif file_values.get("upstream_password_file"):
        password = _read_secret_file(str(file_values["upstream_password_file"]))

    if hub_table.get("password_env") and password is None:
        password = env.get(str(hub_table["password_env"]))
    hub = RegistryConfig(
        name=DOCKER_HUB,
        url=parse_upstream_url(str(pick("upstream"))),
        username=pick("upstream_username"),
        password=password,
        tag_ttl=parse_duration(pick("tag_ttl"), "tag_ttl"),
        token_realms=parse_hosts(pick("token_realms")),
        **_members_policy(hub_table, 'registries."docker.io"'),
    )
    workers = pick("workers") or default_workers(len(os.sched_getaffinity(0)), cgroup_cpu_limit())
    if not str(workers).isdigit() or int(workers) < 1:
        raise ConfigError(f"workers: {workers!r} must be a whole number of processes, at least 1")
    anonymous_pull = parse_bool(pick("anonymous_pull"), "anonymous_pull")
    index_password: str | None = None
    if pick("index_password_file"):
        index_password = _read_secret_file(str(pick("index_password_file")), "index_password_file")
    elif env.get("MIRROR_INDEX_PASSWORD"):
        index_password = env["MIRROR_INDEX_PASSWORD"]
    peer = parse_peer(pick("peer_listen"), pick("peer_url"), pick("cluster_secret_file"), env)
    local_cache_size = parse_size(pick("local_cache_size"), "local_cache_size")
    if local_cache_size < 0:
        raise ConfigError("local_cache_size: must not be negative")
    auth_htpasswd = pick("auth_htpasswd")
    read_timeout = parse_duration(pick("upstream_read_timeout"), "upstream_read_timeout")
    if read_timeout <= 0:
        raise ConfigError("upstream_read_timeout: must be positive")
    max_fetches = pick("max_upstream_fetches")
    if not str(max_fetches).isdigit() or int(max_fetches) < 1:
        raise ConfigError(f"max_upstream_fetches: {max_fetches!r} must be a whole number, >= 1")
    web_ui = pick("web_ui")
    if web_ui not in WEB_UI_PLACES:
        raise ConfigError(f'web_ui: {web_ui!r} must be "registry", "admin" or "off"')
    tls_cert, tls_key = pick("tls_cert"), pick("tls_key")
    named = flags.get("hosted") or env.get("MIRROR_HOSTED") or ()
    hosted_tables = file_values.get("hosted", {})
    hosted = parse_hosted(named, hosted_tables)
    if hosted and not auth_htpasswd:
        raise ConfigError(
            f"hosted: {sorted(hosted)[0]}: hosted namespaces need auth_htpasswd "
            "(pushing always needs a mirror user)"
        )
    hosted_max_size = parse_size(pick("hosted_max_size"), "hosted_max_size")
    if hosted_max_size <= 0:
        raise ConfigError("hosted_max_size: must be positive")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("tls_cert and tls_key: give both (the certificate chain and its key)")
    config = Config(
        listen_host=host,
        listen_port=port,
        data_dir=Path(str(pick("data"))),
        registries={
            DOCKER_HUB: hub,
            **{
                name: _registry_table(name, table, env)
                for name, table in tables.items()
                if name != DOCKER_HUB
            },
        },
        negative_ttl=parse_duration(pick("negative_ttl"), "negative_ttl"),
        max_size=max_size,
        max_age=None if max_age is None else parse_duration(max_age, "max_age"),
        admin_host=admin_host,
        admin_port=admin_port,
        tls_cert=Path(str(tls_cert)) if tls_cert else None,
        tls_key=Path(str(tls_key)) if tls_key else None,
        workers=int(workers),
        auth_htpasswd=Path(str(auth_htpasswd)) if auth_htpasswd else None,
        anonymous_pull=anonymous_pull,
        max_upstream_fetches=int(max_fetches),
        upstream_read_timeout=read_timeout,
        web_ui=web_ui,
        webhooks=parse_webhooks(pick("webhooks")),
        s3=parse_storage(
            pick("storage"),
            pick("s3_endpoint"),
            pick("s3_region"),
            pick("s3_path_style"),
            pick("s3_credentials_file"),
            pick("s3_redirect"),
        ),
        index_url=parse_index(pick("index")),
        index_password=index_password,
        local_cache_size=local_cache_size,
        hosted=hosted,
        hosted_max_size=hosted_max_size,
        **peer,
    )
    if config.clustered and (config.s3 is None or config.index_url is None):
        raise ConfigError(
            'peer_listen: cluster mode needs shared storage: storage = "s3://..." and '
            'index = "postgresql://..."'
        )
    for registry in config.registries.values():
        if registry.private != "members":
            continue
        setting = f'registries."{registry.name}".private = "members"'
        if not config.auth_htpasswd:
            raise ConfigError(f"{setting}: members are the mirror's users: set auth_htpasswd")
        if not registry.credentials:
            raise ConfigError(
                f"{setting}: needs the registry's credentials (without them, all the mirror "
                "fetches is public anyway)"
            )
    passthrough = [r.name for r in config.registries.values() if r.private == "passthrough"]
    if config.auth_htpasswd and passthrough:
        # A client sends one set of credentials: the mirror's own users, or the upstream's.
        raise ConfigError(
            f'auth_htpasswd: cannot be combined with private = "passthrough" ({passthrough[0]})'
        )
    return config
