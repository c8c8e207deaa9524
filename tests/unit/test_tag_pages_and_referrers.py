"""Tag list paging and referrers indexes: the pure parts, with hypothesis properties."""

import json
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import RegistryError
from mirror.mediatypes import OCI_INDEX
from mirror.referrers import descriptors_of, merge_pages, referrers_index, referrers_tag
from mirror.tags import merge_tags, page_after, parse_n, tags_page
from mirror.upstream.pages import next_query

tag_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(st.lists(tag_names, max_size=40), st.integers(min_value=1, max_value=12), st.booleans())
def test_following_the_links_lists_every_tag_once_in_order(
    tags: list[str], n: int, with_ns: bool
) -> None:
    ordered = tuple(sorted(set(tags)))
    path = "/v2/library/alpine/tags/list"
    query = {"n": str(n), **({"ns": "docker.io"} if with_ns else {})}
    seen: list[str] = []
    for _ in range(len(ordered) + 2):
        body, link = tags_page("library/alpine", ordered, query, path)
        page = json.loads(body)["tags"]
        assert len(page) <= n
        seen.extend(page)
        if link is None:
            break
        url = link[1 : link.index(">")]
        assert urlsplit(url).path == path and link.endswith('; rel="next"')
        query = dict(parse_qsl(urlsplit(url).query))
        assert query.get("ns") == ("docker.io" if with_ns else None)
    assert seen == list(ordered)


@given(st.lists(tag_names, max_size=30), tag_names)
def test_last_is_excluded_and_everything_after_it_follows(tags: list[str], last: str) -> None:
    ordered = sorted(set(tags))
    page, more = page_after(ordered, None, last)
    assert page == [t for t in ordered if t > last] and not more


def test_n_zero_is_an_empty_page_without_link() -> None:
    body, link = tags_page("x", ("a", "b"), {"n": "0"}, "/v2/x/tags/list")
    assert json.loads(body) == {"name": "x", "tags": []} and link is None


@pytest.mark.parametrize("bad", ["-1", "two", "²", "1.5"])
def test_a_bad_n_is_refused(bad: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_n(bad)
    assert caught.value.status == 400


@given(st.lists(st.lists(tag_names, max_size=10), max_size=6))
def test_upstream_pages_merge_sorted_and_deduplicated(pages: list[list[str]]) -> None:
    bodies = [json.dumps({"name": "x", "tags": page}).encode() for page in pages]
    assert merge_tags(bodies) == tuple(sorted({t for page in pages for t in page}))


def test_merge_tags_takes_null_and_refuses_what_is_not_a_tag_list() -> None:
    assert merge_tags([b'{"name": "x", "tags": null}']) == ()
    for body in (b"[]", b'{"tags": "a"}', b'{"tags": [1]}', b"<html>"):
        with pytest.raises(ValueError):
            merge_tags([body])


@given(
    st.lists(
        st.tuples(st.sampled_from(["n", "last", "cursor", "x"]), st.text(max_size=12)),
        min_size=1,
        max_size=4,
    )
)
def test_next_query_is_the_links_query_exactly(params: list[tuple[str, str]]) -> None:
    query = urlencode(params)
    link = f'</v2/library/alpine/tags/list?{query}>; rel="next"'
    assert next_query(link) == query
    assert parse_qsl(next_query(link) or "", keep_blank_values=True) == params


def test_next_query_reads_only_a_next_link() -> None:
    assert next_query(None) is None
    assert next_query('</v2/x/tags/list?last=a>; rel="prev"') is None
    assert next_query('</v2/x/tags/list>; rel="next"') is None  # nothing to page with
    two = '</v2/x?last=a>; rel="prev", <https://elsewhere/v2/x/tags/list?c=b%2B>; rel=next'
    assert next_query(two) == "c=b%2B"


def test_referrers_tag_follows_the_tag_schema() -> None:
    assert referrers_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64
    assert referrers_tag("sha512:" + "b" * 128) == "sha512-" + "b" * 64
    odd = "test+algorithm+using+algorithm+separators:alsoSome=InTheEncoded"
    assert referrers_tag(odd) == "test-algorithm-using-algorithm-s-alsoSome-InTheEncoded"


def test_descriptors_of_an_index_only() -> None:
    entry = {"mediaType": OCI_INDEX, "digest": "sha256:" + "1" * 64, "size": 2}
    assert descriptors_of(json.dumps({"manifests": [entry, "junk", {}]}).encode()) == [entry]
    for data in (b"not json", b"[]", b'{"manifests": {}}', b'{"layers": []}'):
        assert descriptors_of(data) is None


def test_referrer_pages_merge_once_per_digest() -> None:
    a = {"digest": "sha256:" + "a" * 64, "artifactType": "t1"}
    b = {"digest": "sha256:" + "b" * 64, "artifactType": "t2"}
    pages = [json.dumps({"manifests": [a]}).encode(), json.dumps({"manifests": [b, a]}).encode()]
    assert merge_pages(pages) == [a, b]
    with pytest.raises(ValueError):
        merge_pages([b"{}"])


@given(
    st.lists(st.sampled_from(["sig", "sbom", "att", None]), max_size=8),
    st.lists(st.sampled_from(["sig", "sbom", "nothing", ""]), max_size=3),
)
def test_artifact_type_filter_keeps_exactly_the_asked_types(
    kinds: list[str | None], wanted: list[str]
) -> None:
    descriptors = [
        {"digest": f"sha256:{i:064x}", **({"artifactType": k} if k else {})}
        for i, k in enumerate(kinds)
    ]
    body, filtered = referrers_index(descriptors, wanted)
    index = json.loads(body)
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    asked = {w for w in wanted if w}
    assert filtered is bool(asked)
    expected = [d for d in descriptors if not asked or d.get("artifactType") in asked]
    assert index["manifests"] == expected
