import json

from mirror.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Negotiation,
    content_type_of,
    negotiate,
    parse_accept,
    platform_child,
    upstream_accept,
)
from mirror.tags import paginate


def test_accept_reads_every_header_and_drops_parameters():
    types = parse_accept((f"{OCI_INDEX}, {DOCKER_MANIFEST};q=0.5", "application/json"))
    assert types == {OCI_INDEX, DOCKER_MANIFEST, "application/json"}


def test_upstream_always_gets_every_manifest_type_plus_extras():
    accept = upstream_accept(frozenset({DOCKER_MANIFEST, "application/x-custom", "*/*"}))
    assert all(t in accept for t in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
    assert accept.endswith("application/x-custom")
    assert "*/*" not in accept


def test_negotiation_like_distribution():
    assert negotiate(OCI_INDEX, frozenset(), by_tag=True) is Negotiation.SERVE
    assert negotiate(OCI_INDEX, frozenset({"*/*"}), by_tag=True) is Negotiation.SERVE
    assert (
        negotiate(DOCKER_LIST, frozenset({DOCKER_MANIFEST}), by_tag=True)
        is Negotiation.DEFAULT_PLATFORM
    )
    assert negotiate(DOCKER_LIST, frozenset({DOCKER_MANIFEST}), by_tag=False) is Negotiation.REJECT
    assert negotiate(OCI_INDEX, frozenset({DOCKER_MANIFEST}), by_tag=True) is Negotiation.REJECT


def test_content_type_from_header_or_body():
    body = json.dumps({"mediaType": DOCKER_MANIFEST}).encode()
    assert content_type_of(body, f"{OCI_MANIFEST}; charset=utf-8") == OCI_MANIFEST
    assert content_type_of(body, "application/json") == DOCKER_MANIFEST
    assert content_type_of(b'{"manifests": []}', None) == OCI_INDEX


def test_platform_child():
    index = json.dumps(
        {
            "manifests": [
                {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
                {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        }
    ).encode()
    assert platform_child(index) == "sha256:amd"
    assert platform_child(b"not json") is None


def test_paginate():
    assert paginate(["c", "a", "b"], 2, None) == (["a", "b"], True)
    assert paginate(["c", "a", "b"], 2, "a") == (["b", "c"], False)
    assert paginate(["a"], None, None) == (["a"], False)
