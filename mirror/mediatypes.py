"""Manifest media types and `Accept` negotiation, pure.

Upstream is always asked with the full list (plus anything extra the client named), so a
narrow client can never poison the cached tag -> digest mapping with a down-converted answer.
What is then *served* is negotiated like distribution's `registry/handlers/manifests.go`: only
an OCI manifest or OCI index the client does not list is refused (MANIFEST_UNKNOWN); a Docker
manifest list asked for by tag by a client that takes no lists gets the linux/amd64 image;
Docker schema2, a Docker list by digest and any other type are served whatever the Accept
(see docs/protocol.md, "Serving").
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from typing import TypeGuard

from mirror.jsondoc import parse_json

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's limit; containerd's own cap is 4,393,216
DEFAULT_PLATFORM = ("linux", "amd64")
# A descriptor's size is an int64 in the spec (and a BIGINT or INTEGER in the index engines):
# a larger or negative one is no size at all.
MAX_DESCRIPTOR_SIZE = 2**63 - 1
# RFC 6838 restricted names: what may be stored and later written into a response head as
# Content-Type. Anything else (a CR/LF in a manifest's `mediaType`) would inject headers.
# Matched whole (fullmatch: `$` alone would let a final newline through).
_MEDIA_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)


def is_media_type(value: object) -> bool:
    return isinstance(value, str) and _MEDIA_TYPE.fullmatch(value) is not None


@functools.lru_cache(maxsize=1024)
def parse_accept(values: tuple[str, ...]) -> frozenset[str]:
    """Every media type in every `Accept` header, parameters (`;q=`) dropped.

    Memoised: clients send the same few header sets on every request of a hit path."""
    types: set[str] = set()
    for value in values:
        for part in value.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    return frozenset(types)


@functools.lru_cache(maxsize=1024)
def upstream_accept(client_types: frozenset[str]) -> str:
    """The Accept to send upstream: every manifest type we serve, then the client's extras."""
    extras = sorted(t for t in client_types if t not in MANIFEST_TYPES and t != "*/*")
    return ", ".join((*MANIFEST_TYPES, *extras))


def accepts(client_types: frozenset[str], media_type: str) -> bool:
    """No Accept at all, or `*/*` (containerd ends its list with it), accepts anything."""
    return not client_types or "*/*" in client_types or media_type in client_types


class Negotiation(Enum):
    SERVE = "serve"
    DEFAULT_PLATFORM = "default-platform"
    REJECT = "reject"


def negotiate(media_type: str, client_types: frozenset[str], by_tag: bool) -> Negotiation:
    """What distribution does: refuse only OCI types the client does not list; a Docker list
    by tag goes to its linux/amd64 child for a client without lists; by digest it can only be
    the list itself (anything else would not match the digest asked for)."""
    if accepts(client_types, media_type):
        return Negotiation.SERVE
    if media_type == DOCKER_LIST and by_tag:
        return Negotiation.DEFAULT_PLATFORM
    if media_type in (OCI_MANIFEST, OCI_INDEX):
        return Negotiation.REJECT
    return Negotiation.SERVE


def content_type_of(data: bytes, header: str | None) -> str:
    """The media type to store: the upstream's Content-Type, else the manifest's `mediaType`.

    Parameters are dropped (`; charset=utf-8` is not part of a media type) so the type can be
    served as Content-Type verbatim; only a `type/subtype` token is ever taken (see
    `is_media_type`), whichever source it comes from.
    """
    if header:
        media_type = header.split(";", 1)[0].strip()
        if is_media_type(media_type) and media_type not in (
            "application/json",
            "application/octet-stream",
        ):
            return media_type
    try:
        doc = parse_json(data)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and is_media_type(doc.get("mediaType")):
        return str(doc["mediaType"])
    if isinstance(doc, dict) and "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def platform_child(index_bytes: bytes, platform: tuple[str, str] = DEFAULT_PLATFORM) -> str | None:
    """The digest of an index entry for `platform` (os, architecture), or None."""
    try:
        doc = parse_json(index_bytes)
    except ValueError:
        return None
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform") or {}
        if (plat.get("os"), plat.get("architecture")) == platform and isinstance(
            entry.get("digest"), str
        ):
            return str(entry["digest"])
    return None


def references(data: bytes) -> list[tuple[str, int]]:
    """The (digest, size) of everything a manifest or index names and its registry holds:
    config, layers, manifests.

    Left out: descriptors with `urls` (foreign, non-distributable layers). A registry accepts
    a manifest naming one without holding the blob (clients fetch it from the URLs;
    distribution skips its existence check for them), so naming one proves nothing about the
    repository: counted as held, any public manifest could name another repository's private
    layer and unlock it from the cache (see membership.py)."""
    try:
        doc = parse_json(data)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    entries: list[object] = []
    if isinstance(doc.get("config"), dict):
        entries.append(doc["config"])
    for key in ("layers", "manifests"):
        if isinstance(doc.get(key), list):
            entries.extend(doc[key])
    found: list[tuple[str, int]] = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            if entry.get("urls"):
                continue
            size = entry.get("size")
            found.append((entry["digest"], size if is_descriptor_size(size) else 0))
    return found


def is_descriptor_size(value: object) -> TypeGuard[int]:
    """A size a descriptor may carry: an int (JSON's true is one in Python) within int64."""
    return type(value) is int and 0 <= value <= MAX_DESCRIPTOR_SIZE
