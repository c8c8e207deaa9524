from pathlib import Path

import pytest

from mirror.config import ConfigError, load_config, parse_duration, parse_size


def test_defaults() -> None:
    config = load_config({}, {})
    hub = config.registries["docker.io"]
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 5000)
    assert config.data_dir == Path("./mirror-data")
    assert hub.url == "https://registry-1.docker.io" and hub.tag_ttl == 300
    assert hub.credentials is None


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text(
        'listen = "127.0.0.1:7000"\ntag_ttl = "1h"\nupstream = "http://file:1"\ndata = "/f"\n'
    )
    env = {"MIRROR_TAG_TTL": "10m", "MIRROR_UPSTREAM": "http://env:2"}
    config = load_config({"upstream": "http://flag:3"}, env, str(toml))
    hub = config.registries["docker.io"]
    assert hub.url == "http://flag:3"
    assert hub.tag_ttl == 600
    assert config.listen_port == 7000
    assert config.data_dir == Path("/f")


def test_password_sources_and_secret_never_in_repr(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = load_config({"upstream_username": "u", "upstream_password_file": str(secret)}, {})
    hub = config.registries["docker.io"]
    assert hub.credentials == ("u", "s3cret")
    assert "s3cret" not in repr(config)
    config = load_config({}, {"MIRROR_UPSTREAM_USERNAME": "u", "MIRROR_UPSTREAM_PASSWORD": "p"})
    assert config.registries["docker.io"].credentials == ("u", "p")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("300", 300), (90, 90), ("90s", 90), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1.5m", 90)],
)
def test_durations(value: str | int, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        ({"tag_ttl": "soon"}, "tag_ttl"),
        ({"listen": "nope"}, "listen"),
        ({"upstream": "ftp://x"}, "upstream"),
        ({"upstream_password_file": "/does/not/exist"}, "upstream_password_file"),
    ],
)
def test_bad_settings_name_the_setting(flags: dict[str, str], text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        load_config(flags, {})


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text("tag_tll = 5\n")
    with pytest.raises(ConfigError, match="tag_tll"):
        load_config({}, {}, str(toml))


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1048576", 1 << 20),
        (42, 42),
        ("500MiB", 500 << 20),
        ("50GiB", 50 << 30),
        ("2GB", 2 * 10**9),
        ("1.5KiB", 1536),
        ("10k", 10000),
        ("7B", 7),
    ],
)
def test_sizes(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "lots", "5 parsecs", "-1MiB"])
def test_bad_sizes(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(value)


def test_token_realms_and_negative_ttl(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text(
        'token_realms = ["login.example", "https://auth.example/token"]\nnegative_ttl = "1m"\n'
    )
    config = load_config({}, {}, str(toml))
    assert config.registries["docker.io"].token_realms == ("login.example", "auth.example")
    assert config.negative_ttl == 60
    config = load_config(
        {"token_realms": ["a.example"]}, {"MIRROR_TOKEN_REALMS": "b.example,c.example"}
    )
    assert config.registries["docker.io"].token_realms == ("a.example",)
    config = load_config(
        {}, {"MIRROR_TOKEN_REALMS": "b.example, c.example", "MIRROR_NEGATIVE_TTL": "0"}
    )
    assert config.registries["docker.io"].token_realms == ("b.example", "c.example")
    assert config.negative_ttl == 0


def test_registry_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "ghcr-token"
    pw.write_text("ghp_secret\n")
    toml = tmp_path / "m.toml"
    toml.write_text(
        f'''
[registries."ghcr.io"]
url = "https://ghcr.io"
username = "bot"
password_file = "{pw}"
tag_ttl = "1m"

[registries."registry.corp:5000"]
url = "http://registry.corp:5000"
password_env = "CORP_PW"
username = "ci"
token_realms = ["login.corp"]

[registries."docker.io"]
tag_ttl = "10m"
'''
    )
    config = load_config({}, {"CORP_PW": "corp-secret"}, str(toml))
    assert set(config.registries) == {"docker.io", "ghcr.io", "registry.corp:5000"}
    ghcr = config.registries["ghcr.io"]
    assert (ghcr.url, ghcr.credentials, ghcr.tag_ttl) == (
        "https://ghcr.io",
        ("bot", "ghp_secret"),
        60,
    )
    corp = config.registries["registry.corp:5000"]
    assert corp.credentials == ("ci", "corp-secret") and corp.token_realms == ("login.corp",)
    assert config.registries["docker.io"].tag_ttl == 600
    assert "ghp_secret" not in repr(config) and "corp-secret" not in repr(config)


@pytest.mark.parametrize(
    ("table", "text"),
    [
        ('[registries."ghcr.io"]\nurll = "x"', "urll"),
        ('[registries."Bad Name"]\nurl = "https://x"', "host"),
        ('[registries."ghcr.io"]\nurl = "ftp://x"', "url"),
        ('[registries."ghcr.io"]\npassword_env = "NOPE_UNSET"', "NOPE_UNSET"),
        ('[registries."docker.io"]\ntagttl = "1m"', "tagttl"),
    ],
)
def test_bad_registry_tables(tmp_path: Path, table: str, text: str) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text(table + "\n")
    with pytest.raises(ConfigError, match=text):
        load_config({}, {}, str(toml))


def test_tls_needs_both_files_and_a_bad_file_stops_the_start(tmp_path: Path) -> None:
    from mirror.app import tls_context

    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_config({"tls_cert": "/x.crt"}, {}, None)
    assert tls_context(load_config({}, {}, None)) is None
    (tmp_path / "bad.pem").write_text("not a certificate")
    config = load_config({}, {"MIRROR_TLS_CERT": str(tmp_path / "bad.pem"),
                              "MIRROR_TLS_KEY": str(tmp_path / "bad.pem")}, None)  # fmt: skip
    assert config.tls_cert == tmp_path / "bad.pem"
    with pytest.raises(ConfigError, match="tls_cert/tls_key: cannot load"):
        tls_context(config)
