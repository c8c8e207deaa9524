"""Every `mirror serve` flag reaches the Config (a flag parsed and then dropped is a silent lie)."""

import argparse
from pathlib import Path

import pytest

from mirror.cli import _CONFIG_FLAGS, _parser, config_from_args, main


def test_every_serve_flag_reaches_the_config(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw")
    args = _parser().parse_args(
        ["serve", "--listen", "127.0.0.1:7000", "--data", "/d", "--upstream", "http://u:1",
         "--upstream-username", "me", "--upstream-password-file", str(secret), "--tag-ttl", "1m",
         "--token-realm", "auth.example", "--negative-ttl", "5s", "--max-size", "1GiB",
         "--max-age", "7d", "--admin-listen", "127.0.0.1:7001", "--workers", "3",
         "--tls-cert", "/c.pem", "--tls-key", "/k.pem"]
    )  # fmt: skip
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    not_settings = {"help", "config", "log_level", "log_format", "worker"}
    serve_dests = {a.dest for a in subparsers.choices["serve"]._actions} - not_settings
    assert serve_dests == set(_CONFIG_FLAGS)
    config = config_from_args(args)
    hub = config.registries["docker.io"]
    assert (config.listen_port, config.admin_port, config.max_size) == (7000, 7001, 1 << 30)
    assert (config.max_age, config.negative_ttl, hub.tag_ttl) == (7 * 86400, 5, 60)
    assert hub.credentials == ("me", "pw") and hub.token_realms == ("auth.example",)
    assert hub.url == "http://u:1" and str(config.data_dir) == "/d"
    assert config.workers == 3 and config.tls_cert == Path("/c.pem")


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    """What `mirror [COMMAND] --help` prints after its usage lines."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out.split("\n\n", 1)[1]


def test_help_opens_with_what_the_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert _help(capsys).startswith("A pull-through caching mirror for Docker Hub")
    assert _help(capsys, "serve").startswith("Serve the registry API on --listen")


def test_every_option_of_every_command_has_help() -> None:
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [c.dest for c in subparsers._choices_actions if not c.help]
    for name, command in {"mirror": parser, **subparsers.choices}.items():
        undocumented += [
            f"{name} {'/'.join(a.option_strings) or a.dest}"
            for a in command._actions
            if not a.help and not isinstance(a, argparse._SubParsersAction)
        ]
    assert undocumented == []
