from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import RegistryError
from mirror.reference import Endpoint, parse_v2_path
from mirror.store.blobs import BlobStore

REGS = frozenset({"docker.io", "ghcr.io"})
D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("path", "ns", "expected"),
    [
        ("alpine/manifests/3.19", None, ("docker.io", "library/alpine", Endpoint.MANIFEST, "3.19")),
        (
            "library/alpine/manifests/3.19",
            "docker.io",
            ("docker.io", "library/alpine", Endpoint.MANIFEST, "3.19"),
        ),
        (f"team/app/blobs/{D}", None, ("docker.io", "team/app", Endpoint.BLOB, D)),
        ("a/b/c/tags/list", None, ("docker.io", "a/b/c", Endpoint.TAGS, "")),
        ("ghcr.io/owner/img/manifests/v1", None, ("ghcr.io", "owner/img", Endpoint.MANIFEST, "v1")),
        ("owner/img/manifests/v1", "ghcr.io", ("ghcr.io", "owner/img", Endpoint.MANIFEST, "v1")),
        (
            "x/manifests/y/manifests/v1",
            None,
            ("docker.io", "x/manifests/y", Endpoint.MANIFEST, "v1"),
        ),
        ("x/blobs/manifests/v1", None, ("docker.io", "x/blobs", Endpoint.MANIFEST, "v1")),
    ],
)
def test_routes(path: str, ns: str | None, expected: tuple[str, str, Endpoint, str]) -> None:
    route = parse_v2_path(path, ns, REGS)
    assert (route.registry, route.repository, route.endpoint, route.reference) == expected


@pytest.mark.parametrize(
    ("path", "ns", "code"),
    [
        ("Alpine/manifests/latest", None, "NAME_INVALID"),
        ("../etc/manifests/latest", None, "NAME_INVALID"),
        ("a//b/manifests/latest", None, "NAME_INVALID"),
        # A tag no manifest can have is "not there" for a read (TAG_INVALID is for pushes).
        ("a/manifests/-bad", None, "MANIFEST_UNKNOWN"),
        ("a/manifests/.INVALID", None, "MANIFEST_UNKNOWN"),
        ("a/manifests/" + "t" * 129, None, "MANIFEST_UNKNOWN"),
        ("a/manifests/sha256:" + "a" * 63, None, "DIGEST_INVALID"),
        # A final newline is not part of a name, tag or digest (`$` alone would match it).
        ("a/manifests/v1\n", None, "MANIFEST_UNKNOWN"),
        ("a/blobs/sha256:" + "a" * 64 + "\n", None, "DIGEST_INVALID"),
        ("alpine\n/manifests/v1", None, "NAME_INVALID"),
        ("a/blobs/sha256:" + "a" * 63, None, "DIGEST_INVALID"),
        ("a/blobs/sha512:" + "a" * 64, None, "DIGEST_INVALID"),
        ("a/blobs/latest", None, "DIGEST_INVALID"),
        ("a/manifests/", None, "NAME_UNKNOWN"),
        ("a/nothing", None, "NAME_UNKNOWN"),
        ("quay.io/x/manifests/v1", None, "NAME_UNKNOWN"),
        ("x/manifests/v1", "quay.io", "NAME_UNKNOWN"),
    ],
)
def test_rejections(path: str, ns: str | None, code: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_v2_path(path, ns, REGS)
    assert info.value.code == code
    assert 400 <= info.value.status < 500


@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=20)))
def test_any_path_parses_or_is_a_client_error_and_stays_inside_the_store(
    path: str, ns: str | None
) -> None:
    store = BlobStore(Path("/data"))
    try:
        route = parse_v2_path(path, ns, REGS)
    except RegistryError as exc:
        assert 400 <= exc.status < 500
        return
    assert ".." not in route.repository.split("/")
    if route.endpoint is Endpoint.BLOB:
        # Resolved, not compared as text: "/data/blobs/sha256/../.." starts with the prefix.
        assert store.path(route.reference).resolve().is_relative_to("/data/blobs")
