import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.upstream.auth import (
    TokenCache,
    parse_www_authenticate,
    realm_may_receive_credentials,
    token_from_response,
)


def test_hub_challenge() -> None:
    [c] = parse_www_authenticate(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"'
        ]
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scopes == ("repository:library/alpine:pull",)


def test_quoted_commas_several_scopes_and_several_challenges() -> None:
    challenges = parse_www_authenticate(
        [
            'Basic realm="a, b"',
            'Bearer realm="https://x/t", scope="repository:a:pull repository:b:pull,push"',
        ]
    )
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].realm == "a, b"
    assert challenges[1].scopes == ("repository:a:pull", "repository:b:pull,push")


def test_two_challenges_in_one_header() -> None:
    challenges = parse_www_authenticate(['Basic realm="r1", Bearer realm="r2",service=s'])
    assert [(c.scheme, c.realm) for c in challenges] == [("basic", "r1"), ("bearer", "r2")]
    assert challenges[1].service == "s"


def test_escaped_quote() -> None:
    [c] = parse_www_authenticate([r'Bearer realm="a\"b"'])
    assert c.realm == 'a"b'


@given(st.lists(st.text(max_size=80), max_size=3))
def test_parser_never_raises(headers: list[str]) -> None:
    parse_www_authenticate(headers)


@pytest.mark.parametrize(
    ("realm", "registry", "extra", "allowed"),
    [
        ("https://auth.docker.io/token", "https://registry-1.docker.io", (), True),
        ("https://registry-1.docker.io/token", "https://registry-1.docker.io", (), True),
        ("https://evil.example/token", "https://registry-1.docker.io", (), False),
        ("http://auth.docker.io/token", "https://registry-1.docker.io", (), False),
        ("https://auth.docker.io.evil.example/t", "https://registry-1.docker.io", (), False),
        ("https://login.example/t", "https://registry.corp", ("login.example",), True),
        ("http://127.0.0.1:9/token", "http://127.0.0.1:5000", (), True),
        ("http://127.0.0.2:9/token", "http://127.0.0.1:5000", (), False),
        ("http://10.0.0.1/token", "https://ghcr.io", (), False),
        ("not a url", "https://ghcr.io", (), False),
    ],
)
def test_credentials_only_go_to_the_registrys_own_realm(
    realm: str, registry: str, extra: tuple[str, ...], allowed: bool
) -> None:
    assert realm_may_receive_credentials(realm, registry, extra) is allowed


def test_token_lifetime_counts_from_receipt_less_a_margin() -> None:
    token = token_from_response(
        {"token": "t", "expires_in": 300, "issued_at": "1999-01-01T00:00:00Z"}, 1000.0
    )
    assert token.value == "t" and 1000 + 240 <= token.expires_at < 1000 + 300
    assert token_from_response({"access_token": "a"}, 0).value == "a"
    with pytest.raises(ValueError):
        token_from_response({"expires_in": 3}, 0)


def test_token_cache_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TokenCache()
    key = ("r", "s", ("scope",), False)
    token = token_from_response({"token": "t", "expires_in": 0.001}, 0)  # already past
    cache.put(key, token)
    assert cache.get(key) is None
