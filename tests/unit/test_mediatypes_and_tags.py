import json

from mirror.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Negotiation,
    content_type_of,
    is_media_type,
    negotiate,
    parse_accept,
    platform_child,
    references,
    upstream_accept,
)
from mirror.tags import MAX_N, paginate, parse_n


def test_accept_reads_every_header_and_drops_parameters() -> None:
    types = parse_accept((f"{OCI_INDEX}, {DOCKER_MANIFEST};q=0.5", "application/json"))
    assert types == {OCI_INDEX, DOCKER_MANIFEST, "application/json"}


def test_upstream_always_gets_every_manifest_type_plus_extras() -> None:
    accept = upstream_accept(frozenset({DOCKER_MANIFEST, "application/x-custom", "*/*"}))
    assert all(t in accept for t in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
    assert accept.endswith("application/x-custom")
    assert "*/*" not in accept


def test_negotiation_like_distribution() -> None:
    assert negotiate(OCI_INDEX, frozenset(), by_tag=True) is Negotiation.SERVE
    assert negotiate(OCI_INDEX, frozenset({"*/*"}), by_tag=True) is Negotiation.SERVE
    assert (
        negotiate(DOCKER_LIST, frozenset({DOCKER_MANIFEST}), by_tag=True)
        is Negotiation.DEFAULT_PLATFORM
    )
    # By digest, a Docker list can only be the list itself: served whatever the Accept.
    assert negotiate(DOCKER_LIST, frozenset({DOCKER_MANIFEST}), by_tag=False) is Negotiation.SERVE
    assert negotiate(OCI_INDEX, frozenset({DOCKER_MANIFEST}), by_tag=True) is Negotiation.REJECT
    assert negotiate(OCI_MANIFEST, frozenset({OCI_INDEX}), by_tag=False) is Negotiation.REJECT


def test_schema2_is_served_to_clients_that_list_only_oci_types() -> None:
    """distribution serves Docker schema2 whatever the Accept, by tag and by digest (the OCI
    conformance suite's clients accept only OCI types)."""
    oci_only = frozenset({OCI_INDEX, OCI_MANIFEST})
    for by_tag in (True, False):
        assert negotiate(DOCKER_MANIFEST, oci_only, by_tag=by_tag) is Negotiation.SERVE
    assert negotiate(DOCKER_LIST, oci_only, by_tag=True) is Negotiation.DEFAULT_PLATFORM
    assert negotiate("application/vnd.example+json", oci_only, by_tag=True) is Negotiation.SERVE


def test_only_a_type_subtype_token_is_ever_stored_as_media_type() -> None:
    injected = json.dumps({"mediaType": "application/x\r\nX-Injected: yes"}).encode()
    assert content_type_of(injected, "application/json") == OCI_MANIFEST
    assert content_type_of(b"{}", "text/x\r\nX-Injected: yes") == OCI_MANIFEST
    assert content_type_of(b"{}", "application/vnd.example.manifest.v1+json; a=b") == (
        "application/vnd.example.manifest.v1+json"
    )
    assert not is_media_type("application/")
    assert not is_media_type(f"{OCI_MANIFEST}\n")  # a final newline would end a head early
    trailing = json.dumps({"mediaType": f"{DOCKER_MANIFEST}\n"}).encode()
    assert content_type_of(trailing, "application/json") == OCI_MANIFEST
    assert not is_media_type("a b/c")


def test_content_type_from_header_or_body() -> None:
    body = json.dumps({"mediaType": DOCKER_MANIFEST}).encode()
    assert content_type_of(body, f"{OCI_MANIFEST}; charset=utf-8") == OCI_MANIFEST
    assert content_type_of(body, "application/json") == DOCKER_MANIFEST
    assert content_type_of(b'{"manifests": []}', None) == OCI_INDEX


def test_platform_child() -> None:
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


def test_paginate() -> None:
    assert paginate(["c", "a", "b"], 2, None) == (["a", "b"], True)
    assert paginate(["c", "a", "b"], 2, "a") == (["b", "c"], False)
    assert paginate(["a"], None, None) == (["a"], False)


def test_references_count_only_sizes_an_index_can_hold() -> None:
    """A size past int64, negative, or JSON's true (an int to Python) is no size: counted
    as 0, never bound into the index (SQLite's OverflowError, PostgreSQL's data error)."""
    digest = "sha256:" + "a" * 64
    sizes = [2**64, 2**63, -1, True, 2**63 - 1, 7]
    doc = {"manifests": [{"digest": digest, "size": size} for size in sizes]}
    assert [size for _, size in references(json.dumps(doc).encode())] == [0, 0, 0, 0, 2**63 - 1, 7]
    assert references(b"[" * 100_000 + b"]" * 100_000) == []


def test_a_page_size_past_any_list_means_all_of_it() -> None:
    assert parse_n("25") == 25
    assert parse_n("9" * 5000) == parse_n("9" * 19) == MAX_N
