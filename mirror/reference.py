"""Repository names, tags, digests and the routing of a `/v2/` path, as pure functions.

The grammar is distribution-spec's (https://github.com/opencontainers/distribution-spec,
"Pulling manifests"): lowercase path components joined by `/`, tags of at most 128 characters,
digests `algorithm:hex`. Everything that later becomes a file name or an upstream URL passes
through here first, so a name that parses can never climb out of the data directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from mirror.errors import RegistryError

DOCKER_HUB = "docker.io"
# The registry key of the team's own repositories (hosted/): in the index beside the
# upstreams' keys, never a configured upstream (config.py refuses a registry of this name).
HOSTED = "hosted"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
NAME_COMPONENT_RE = re.compile(rf"^{_COMPONENT}$")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN_RE = re.compile(rf"^{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*(?::[0-9]+)?$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# Only algorithms we can verify are accepted: an unverifiable digest would let a wrong byte through.
# Every pattern here is applied with fullmatch: `$` would also match before a final newline.
_DIGEST_HEX = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")
MAX_NAME_LENGTH = 255


class Endpoint(Enum):
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True, slots=True)
class Route:
    """A parsed `/v2/<name>/...` request: which registry, which repository, what is asked."""

    registry: str
    repository: str
    endpoint: Endpoint
    reference: str = ""

    @property
    def is_digest(self) -> bool:
        return self.reference.startswith(("sha256:", "sha512:"))


def validate_digest(value: str) -> str:
    """Return the digest unchanged if it is one we can verify, else raise DIGEST_INVALID."""
    match = _DIGEST_RE.fullmatch(value)
    if not match or len(match.group(2)) != _DIGEST_HEX[match.group(1)]:
        raise RegistryError.digest_invalid(value)
    return value


def is_digest(value: str) -> bool:
    """`validate_digest` as a question: for names found on disk or in a bucket listing."""
    match = _DIGEST_RE.fullmatch(value)
    return match is not None and len(match.group(2)) == _DIGEST_HEX[match.group(1)]


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise RegistryError.name_invalid(name)
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise RegistryError.tag_invalid(tag)
    return tag


def looks_like_registry_host(component: str) -> bool:
    """Docker's reference grammar: a host-naming first component has `.`, `:` or is localhost."""
    return "." in component or ":" in component or component == "localhost"


def normalize_repository(registry: str, name: str) -> str:
    """Docker Hub stores official images under `library/`; `alpine` means `library/alpine`."""
    if registry == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name


_SUFFIXES: tuple[tuple[str, Endpoint], ...] = (
    ("/manifests/", Endpoint.MANIFEST),
    ("/blobs/", Endpoint.BLOB),
    ("/referrers/", Endpoint.REFERRERS),
)


def routed_name(registry: str, repository: str) -> str:
    """The name clients use through the mirror: Docker Hub repositories by name
    (`library/alpine`), others with their registry as prefix (`ghcr.io/owner/app`)."""
    return repository if registry in (DOCKER_HUB, HOSTED) else f"{registry}/{repository}"


def listed_name(registry: str, repository: str, hosted: frozenset[str]) -> str:
    """The name a listing (`_catalog`, search) shows, one a client can pull by: routed_name,
    except for a Docker Hub repository under a hosted namespace's name, which `acme/tool`
    would route to the hosted one: `docker.io/acme/tool` reaches it."""
    if registry == DOCKER_HUB and repository.partition("/")[0] in hosted:
        return f"{DOCKER_HUB}/{repository}"
    return routed_name(registry, repository)


def parse_v2_path(
    path: str, ns: str | None, registries: frozenset[str], hosted: frozenset[str] = frozenset()
) -> Route:
    """Route the decoded path after `/v2/` to a registry, repository and endpoint.

    The split is on the *last* endpoint marker, because a repository may itself contain
    `manifests` or `blobs` as a component. `ns` (containerd) names the registry; otherwise a
    host-like first component does, otherwise Docker Hub. Only configured registries are
    routable: the mirror must never become an open proxy. A first component naming a hosted
    namespace routes to HOSTED when no `ns` is given: the team's `acme/app` shadows Docker
    Hub's `acme/app` for docker and podman, while containerd's `ns=docker.io` still reaches
    Docker Hub.
    """
    name: str
    endpoint: Endpoint
    reference = ""
    if path.endswith("/tags/list"):
        name, endpoint = path[: -len("/tags/list")], Endpoint.TAGS
    else:
        best = -1
        found: Endpoint | None = None
        marker_len = 0
        for marker, kind in _SUFFIXES:
            at = path.rfind(marker)
            if at > best:
                best, found, marker_len = at, kind, len(marker)
        if found is None or best <= 0:
            raise RegistryError.not_found_route(path)
        name, endpoint, reference = path[:best], found, path[best + marker_len :]
        if not reference or "/" in reference:
            raise RegistryError.not_found_route(path)

    registry = DOCKER_HUB
    first, _, rest = name.partition("/")
    if ns:
        registry = ns
    elif first in hosted:
        return _route(HOSTED, validate_name(name), endpoint, reference)
    elif rest and looks_like_registry_host(first):
        if not DOMAIN_RE.fullmatch(first):
            raise RegistryError.name_invalid(name)
        registry, name = first, rest
    if registry not in registries:
        raise RegistryError.registry_unknown(registry)
    name = normalize_repository(registry, validate_name(name))
    return _route(registry, name, endpoint, reference)


def _route(registry: str, name: str, endpoint: Endpoint, reference: str) -> Route:
    if endpoint is Endpoint.MANIFEST:
        if ":" in reference:
            validate_digest(reference)
        elif not TAG_RE.fullmatch(reference):
            # No manifest can have this name, so the answer to a read is "not there" (the
            # spec's 404, what distribution answers); TAG_INVALID belongs to pushes.
            raise RegistryError.manifest_unknown(reference[:300], "no manifest has this name")
    elif endpoint in (Endpoint.BLOB, Endpoint.REFERRERS):
        validate_digest(reference)
    return Route(registry, name, endpoint, reference)


_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def parse_image(image: str, registries: frozenset[str] | None) -> tuple[str, str, str]:
    """`alpine`, `alpine:3.19`, `ghcr.io/o/i:v1`, `name@sha256:...` -> (registry, repository, ref).

    Docker's reference rules: a host-like first component names the registry, the tag
    defaults to `latest`, and a one-component Docker Hub name lives under `library/`.
    `registries` None: any registry (a client that does not know the server's configuration).
    """
    name, at, digest = image.strip().partition("@")
    reference = validate_digest(digest) if at else ""
    last = name.rsplit("/", 1)[-1]
    if not at and ":" in last:
        name, _, reference = name.rpartition(":")
        validate_tag(reference)
    reference = reference or "latest"
    registry = DOCKER_HUB
    first, _, rest = name.partition("/")
    if rest and looks_like_registry_host(first):
        registry, name = ("docker.io" if first in _HUB_ALIASES else first), rest
    if registries is not None and registry not in registries:
        raise RegistryError.registry_unknown(registry)
    return registry, normalize_repository(registry, validate_name(name)), reference
