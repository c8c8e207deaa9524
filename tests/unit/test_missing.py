import time

import pytest

from mirror.errors import RegistryError
from mirror.missing import MissingCache


def test_a_404_is_remembered_for_its_reference_only():
    cache = MissingCache(ttl=30)
    cache.remember("docker.io", "library/a", "nope", RegistryError.manifest_unknown("nope"))
    with pytest.raises(RegistryError) as info:
        cache.check("docker.io", "library/a", "nope")
    assert info.value.code == "MANIFEST_UNKNOWN"
    cache.check("docker.io", "library/a", "other")
    cache.check("docker.io", "library/b", "nope")


def test_name_unknown_covers_the_whole_repository():
    cache = MissingCache(ttl=30)
    cache.remember("docker.io", "nobody/here", "v1", RegistryError.name_unknown("nobody/here"))
    with pytest.raises(RegistryError):
        cache.check("docker.io", "nobody/here", "v2")


def test_an_upstream_401_covers_the_whole_repository():
    """Docker Hub's answer for a missing or private repository, even with a fresh token."""
    cache = MissingCache(ttl=30)
    cache.remember("docker.io", "typo/name", "v1", RegistryError.unauthorized())
    with pytest.raises(RegistryError) as info:
        cache.check("docker.io", "typo/name", "latest")
    assert info.value.status == 401
    cache.check("docker.io", "typo/other", "v1")


@pytest.mark.parametrize(
    "error",
    [
        RegistryError.denied(),
        RegistryError.too_many_requests("9"),
        RegistryError.unavailable(),
    ],
)
def test_other_errors_are_not_remembered(error):
    cache = MissingCache(ttl=30)
    cache.remember("docker.io", "library/a", "x", error)
    cache.check("docker.io", "library/a", "x")


def test_zero_ttl_disables_and_entries_expire():
    off = MissingCache(ttl=0)
    off.remember("r", "n", "x", RegistryError.manifest_unknown("x"))
    off.check("r", "n", "x")
    short = MissingCache(ttl=0.05)
    short.remember("r", "n", "x", RegistryError.manifest_unknown("x"))
    time.sleep(0.06)
    short.check("r", "n", "x")
