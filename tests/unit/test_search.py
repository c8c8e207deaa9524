"""The pure parts of `docker search` (mirror/search.py): query parsing, names, matching,
paging."""

from __future__ import annotations

import pytest

from mirror.errors import RegistryError
from mirror.search import (
    SearchQuery,
    matches,
    parse_search_query,
    search_entry,
    search_results,
)

NO_HOSTED: frozenset[str] = frozenset()


def test_query_defaults_to_25_results_on_the_first_page() -> None:
    assert parse_search_query("alp", None, None) == SearchQuery("alp", 25, 1)
    assert parse_search_query(None, "", "") == SearchQuery("", 25, 1)
    assert parse_search_query("x", "100", "7") == SearchQuery("x", 100, 7)


@pytest.mark.parametrize(
    ("n", "page", "named"),
    [
        ("0", None, "n"),
        ("101", None, "n"),
        ("-1", None, "n"),
        ("ten", None, "n"),
        ("²", None, "n"),
        ("9" * 5000, None, "n"),
        (None, "0", "page"),
        (None, "-2", "page"),
        (None, "1.5", "page"),
        (None, "1" * 11, "page"),
    ],
)
def test_bad_page_size_or_page_is_a_400_naming_the_parameter(
    n: str | None, page: str | None, named: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_search_query("x", n, page)
    assert caught.value.status == 400
    assert caught.value.code == "PAGINATION_NUMBER_INVALID"
    assert named in caught.value.detail


def test_official_images_are_shown_as_docker_hub_shows_them() -> None:
    alpine = search_entry("docker.io", "library/alpine", NO_HOSTED)
    assert (alpine.name, alpine.routed, alpine.is_official) == ("alpine", "library/alpine", True)
    team = search_entry("docker.io", "team/app", NO_HOSTED)
    assert (team.name, team.is_official) == ("team/app", False)
    ghcr = search_entry("ghcr.io", "owner/library/app", NO_HOSTED)
    assert (ghcr.name, ghcr.is_official) == ("ghcr.io/owner/library/app", False)
    hosted = search_entry("hosted", "acme/app", frozenset({"acme"}))
    assert (hosted.name, hosted.is_official) == ("acme/app", False)


def test_an_official_image_shadowed_by_a_hosted_namespace_keeps_its_library_prefix() -> None:
    # `redis` would route to the hosted namespace `redis`; `library/redis` reaches Docker Hub.
    entry = search_entry("docker.io", "library/redis", frozenset({"redis"}))
    assert (entry.name, entry.is_official) == ("library/redis", True)


def test_terms_match_a_case_insensitive_substring_of_the_shown_or_routed_name() -> None:
    alpine = search_entry("docker.io", "library/alpine", NO_HOSTED)
    for term in ("alp", "ALPINE", "library/alp", "ine", ""):
        assert matches(alpine, term), term
    for term in ("docker.io", "alpine3", "library/alpine/"):
        assert not matches(alpine, term), term
    ghcr = search_entry("ghcr.io", "owner/app", NO_HOSTED)
    assert matches(ghcr, "GHCR.io/Owner") and not matches(ghcr, "ghcr.io/other")


def test_results_are_sorted_paged_and_counted_over_all_pages() -> None:
    pairs = [("docker.io", f"team/app{i}") for i in range(5)] + [("docker.io", "library/zz")]
    first = search_results(pairs, SearchQuery("APP", 2, 1), NO_HOSTED)
    assert first == {
        "num_results": 5,
        "num_pages": 3,
        "page": 1,
        "page_size": 2,
        "query": "APP",
        "results": [
            {
                "name": f"team/app{i}",
                "description": "",
                "is_official": False,
                "is_automated": False,
                "star_count": 0,
            }
            for i in (0, 1)
        ],
    }
    last = search_results(reversed(pairs), SearchQuery("app", 2, 3), NO_HOSTED)
    assert [r["name"] for r in last["results"]] == ["team/app4"]
    beyond = search_results(pairs, SearchQuery("app", 2, 4), NO_HOSTED)
    assert beyond["results"] == [] and beyond["num_results"] == 5
    nothing = search_results(pairs, SearchQuery("nothing"), NO_HOSTED)
    assert (nothing["num_results"], nothing["num_pages"], nothing["results"]) == (0, 0, [])
