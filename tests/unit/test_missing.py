import time

import pytest

from mirror.errors import RegistryError
from mirror.missing import MissingCache


def test_a_404_is_remembered_for_its_reference_only() -> None:
    cache = MissingCache(ttl=30)
    cache.remember(
        "docker.io", "library/a", "manifest", "nope", RegistryError.manifest_unknown("nope")
    )
    with pytest.raises(RegistryError) as info:
        cache.check("docker.io", "library/a", "manifest", "nope")
    assert info.value.code == "MANIFEST_UNKNOWN"
    cache.check("docker.io", "library/a", "manifest", "other")
    cache.check("docker.io", "library/b", "manifest", "nope")


def test_a_missing_manifest_digest_says_nothing_about_a_blob_of_that_digest() -> None:
    cache = MissingCache(ttl=30)
    digest = "sha256:" + "0" * 64
    cache.remember(
        "docker.io", "library/a", "manifest", digest, RegistryError.manifest_unknown(digest)
    )
    cache.check("docker.io", "library/a", "blob", digest)
    cache.remember("docker.io", "library/a", "blob", digest, RegistryError.blob_unknown(digest))
    with pytest.raises(RegistryError) as info:
        cache.check("docker.io", "library/a", "blob", digest)
    assert info.value.code == "BLOB_UNKNOWN"


def test_name_unknown_covers_the_whole_repository() -> None:
    cache = MissingCache(ttl=30)
    cache.remember(
        "docker.io", "nobody/here", "manifest", "v1", RegistryError.name_unknown("nobody/here")
    )
    with pytest.raises(RegistryError):
        cache.check("docker.io", "nobody/here", "manifest", "v2")


def test_an_upstream_401_covers_the_whole_repository() -> None:
    """Docker Hub's answer for a missing or private repository, even with a fresh token."""
    cache = MissingCache(ttl=30)
    refused = RegistryError.unauthorized()
    refused.about_repository = True  # as the upstream client marks the registry's own 401
    cache.remember("docker.io", "typo/name", "manifest", "v1", refused)
    with pytest.raises(RegistryError) as info:
        cache.check("docker.io", "typo/name", "manifest", "latest")
    assert info.value.status == 401
    cache.check("docker.io", "typo/other", "manifest", "v1")


@pytest.mark.parametrize(
    "error",
    [
        RegistryError.unauthorized("upstream token service refused the credentials"),
        RegistryError.denied(),
        RegistryError.too_many_requests("9"),
        RegistryError.unavailable(),
    ],
)
def test_other_errors_are_not_remembered(error: RegistryError) -> None:
    cache = MissingCache(ttl=30)
    cache.remember("docker.io", "library/a", "manifest", "x", error)
    cache.check("docker.io", "library/a", "manifest", "x")


def test_zero_ttl_disables_and_entries_expire() -> None:
    off = MissingCache(ttl=0)
    off.remember("r", "n", "manifest", "x", RegistryError.manifest_unknown("x"))
    off.check("r", "n", "manifest", "x")
    short = MissingCache(ttl=0.05)
    short.remember("r", "n", "manifest", "x", RegistryError.manifest_unknown("x"))
    time.sleep(0.06)
    short.check("r", "n", "manifest", "x")
