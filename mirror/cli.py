"""The `mirror` command: parse arguments, build the Config, call in, print."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from mirror import __version__
from mirror.app import run
from mirror.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror")
    # default=None everywhere: a flag the user did not give must not outrank env or file.
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--data", help="data directory (default ./mirror-data)")
    serve.add_argument(
        "--upstream", help="upstream registry URL (default https://registry-1.docker.io)"
    )
    serve.add_argument("--upstream-username", dest="upstream_username")
    serve.add_argument("--upstream-password-file", dest="upstream_password_file")
    serve.add_argument(
        "--tag-ttl", dest="tag_ttl", help="tag freshness: seconds or 5m/1h (default 5m)"
    )
    serve.add_argument(
        "--token-realm",
        dest="token_realms",
        action="append",
        help="a host allowed to receive the upstream credentials as a token realm (repeatable)",
    )
    serve.add_argument(
        "--negative-ttl", dest="negative_ttl", help="how long an upstream 404 is remembered (30s)"
    )
    serve.add_argument("--config", help="TOML configuration file (same keys)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


_CONFIG_FLAGS = (
    "listen",
    "data",
    "upstream",
    "upstream_username",
    "upstream_password_file",
    "tag_ttl",
    "token_realms",
    "negative_ttl",
)


def serve(args: argparse.Namespace) -> int:
    flags = {
        k: getattr(args, k)
        for k in (
            "listen",
            "data",
            "upstream",
            "upstream_username",
            "upstream_password_file",
            "tag_ttl",
        )
    }
    try:
        config = load_config(flags, os.environ, args.config or os.environ.get("MIRROR_CONFIG"))
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    hub = next(iter(config.registries.values()))
    logging.getLogger("mirror").info(
        "mirror %s listening on %s:%d, data in %s, upstream %s (%s)",
        __version__,
        config.listen_host,
        config.listen_port,
        config.data_dir,
        hub.url,
        "with credentials" if hub.credentials else "anonymous",
    )
    asyncio.run(run(config, access_log_format='%a "%r" %s %b %Tfs'))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2
