"""The `mirror` command: parse arguments, build the Config, call in, print."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from mirror import __version__
from mirror.app import run, tls_context
from mirror.clientauth import load_htpasswd
from mirror.config import Config, ConfigError, load_config
from mirror.hosted.access import check_hosted_users
from mirror.listeners import ListenError
from mirror.logs import setup_logging
from mirror.prefetch import human_bytes, prefetch
from mirror.recovery import IndexOpenError
from mirror.reference import HOSTED, routed_name
from mirror.store.engines import open_index
from mirror.store.index import Index, SqliteIndex
from mirror.workers import WORKER_FLAG, die_with_parent, run_worker, supervise

DESCRIPTION = """\
A pull-through caching mirror for Docker Hub (and other registries you configure). Point
Docker, containerd or podman at `mirror serve` and every layer crosses the internet once;
the other commands pull images into a running mirror, list its cache, and pin or purge."""

SERVE_DESCRIPTION = """\
Serve the registry API on --listen and the admin API on --admin-listen. Settings come from
flags, then MIRROR_* environment variables, then the --config TOML file, then defaults."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror",
        description=DESCRIPTION,
        epilog="`mirror COMMAND --help` for a command's options",
    )
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror", description=SERVE_DESCRIPTION)
    # default=None everywhere: a flag the user did not give must not outrank env or file.
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--data", help="data directory (default ./mirror-data)")
    serve.add_argument(
        "--upstream", help="upstream registry URL (default https://registry-1.docker.io)"
    )
    serve.add_argument(
        "--upstream-username", dest="upstream_username",
        help="Docker Hub account: higher rate limits, private repositories",
    )  # fmt: skip
    serve.add_argument(
        "--upstream-password-file", dest="upstream_password_file",
        help="file holding that account's password or access token",
    )  # fmt: skip
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
    serve.add_argument("--max-size", dest="max_size", help="cache size cap: 500MiB, 50GiB (20GiB)")
    serve.add_argument(
        "--max-age", dest="max_age", help="also expire content unused this long: 30d"
    )
    serve.add_argument(
        "--admin-listen", dest="admin_listen", help="admin API HOST:PORT (127.0.0.1:5001)"
    )
    serve.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain: serve https")
    serve.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--workers", type=int,
        help="processes serving the listen address (default: the cores it may use, counting a "
        "cgroup CPU quota, at most 8)",
    )  # fmt: skip
    serve.add_argument(
        "--auth-htpasswd", dest="auth_htpasswd", help="clients must log in: htpasswd (bcrypt) file"
    )
    serve.add_argument(
        "--anonymous-pull", dest="anonymous_pull", action="store_const", const=True,
        help="with --auth-htpasswd: clients without credentials may still pull public content",
    )  # fmt: skip
    serve.add_argument(
        "--hosted", dest="hosted", action="append", metavar="NAME",
        help="a namespace of your own images, pushed to the mirror (repeatable; needs "
        "--auth-htpasswd)",
    )  # fmt: skip
    serve.add_argument(
        "--hosted-max-size", dest="hosted_max_size",
        help="quota of all hosted images together (10GiB)",
    )  # fmt: skip
    serve.add_argument(
        "--max-upstream-fetches", dest="max_upstream_fetches", type=int,
        help="blob downloads at once per registry and worker; more wait in order (32)",
    )  # fmt: skip
    serve.add_argument(
        "--upstream-read-timeout", dest="upstream_read_timeout",
        help="drop and resume an upstream that sends nothing for this long (30s)",
    )  # fmt: skip
    serve.add_argument(
        "--web-ui", dest="web_ui", choices=["registry", "admin", "off"],
        help="the web page at /: on the registry listener (default), only the admin one, or off",
    )  # fmt: skip
    serve.add_argument(
        "--webhook", dest="webhooks", action="append",
        help="POST event notifications (JSON) to this URL (repeatable)",
    )  # fmt: skip
    serve.add_argument(
        "--storage", help='where blobs live: "local" (the data directory) or s3://bucket/prefix'
    )
    serve.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 API URL (default: AWS)")
    serve.add_argument("--s3-region", dest="s3_region", help="S3 region")
    serve.add_argument(
        "--s3-path-style", dest="s3_path_style", action="store_const", const=True,
        help="address the bucket in the path (MinIO, SeaweedFS, Ceph), not the host name",
    )  # fmt: skip
    serve.add_argument(
        "--s3-credentials-file", dest="s3_credentials_file",
        help="AWS credentials file with the keys (default: the standard AWS chain)",
    )  # fmt: skip
    serve.add_argument(
        "--s3-redirect", dest="s3_redirect", action="store_const", const=True,
        help="answer warm blob GETs with a 307 to a presigned bucket URL",
    )  # fmt: skip
    serve.add_argument(
        "--index", help='the index: "sqlite" (the data directory) or a postgresql:// URL'
    )
    serve.add_argument(
        "--index-password-file", dest="index_password_file",
        help="file holding the PostgreSQL password (or MIRROR_INDEX_PASSWORD)",
    )  # fmt: skip
    serve.add_argument(
        "--local-cache-size", dest="local_cache_size",
        help="with s3 storage: bytes of blobs kept on local disk as a hot tier (10GiB)",
    )  # fmt: skip
    serve.add_argument(
        "--peer-listen", dest="peer_listen",
        help="cluster mode: HOST:PORT of the endpoint other replicas stream downloads from",
    )  # fmt: skip
    serve.add_argument(
        "--peer-url", dest="peer_url",
        help="cluster mode: the URL other replicas reach --peer-listen by",
    )  # fmt: skip
    serve.add_argument(
        "--cluster-secret-file", dest="cluster_secret_file",
        help="cluster mode: the replicas' shared secret (or MIRROR_CLUSTER_SECRET)",
    )  # fmt: skip
    serve.add_argument(WORKER_FLAG, dest="worker", help=argparse.SUPPRESS)  # set by the supervisor
    serve.add_argument("--config", help="TOML configuration file (same keys)")
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="least severe log lines written (default info)",
    )  # fmt: skip
    serve.add_argument(
        "--log-format",
        default=os.environ.get("MIRROR_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="log lines for people (text) or log collectors (json)",
    )
    _add_operator_commands(sub)
    return parser


_CONFIG_FLAGS = (
    "listen", "data", "upstream", "upstream_username", "upstream_password_file", "tag_ttl",
    "token_realms", "negative_ttl", "max_size", "max_age", "admin_listen", "tls_cert", "tls_key",
    "workers", "auth_htpasswd", "anonymous_pull", "max_upstream_fetches", "upstream_read_timeout",
    "web_ui", "webhooks", "storage", "s3_endpoint", "s3_region", "s3_path_style",
    "s3_credentials_file", "s3_redirect", "index", "index_password_file", "local_cache_size",
    "peer_listen", "peer_url", "cluster_secret_file", "hosted", "hosted_max_size",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config `mirror serve` runs with: its flags over the environment over the file."""
    flags = {k: getattr(args, k) for k in _CONFIG_FLAGS}
    return load_config(flags, os.environ, args.config or os.environ.get("MIRROR_CONFIG"))


def serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        config = config_from_args(args)
        tls = tls_context(config)
        if config.auth_htpasswd:
            users = load_htpasswd(config.auth_htpasswd)  # a bad file stops the start
            check_hosted_users(config.hosted, frozenset(users))
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    if args.worker:
        number, parent, report_fd = args.worker.split(":")
        die_with_parent(int(parent))
        return run_worker(config, tls, int(number), int(report_fd))

    def announce() -> None:
        """Said once the addresses are bound and (with workers) every worker is up."""
        registries = ", ".join(
            f"{r.name} -> {r.url}{' (with credentials)' if r.credentials else ''}"
            for r in config.registries.values()
        )
        logging.getLogger("mirror").info(
            "mirror %s listening on %s:%d (admin %s:%d, %d worker(s)), data in %s; registries: %s",
            __version__, config.listen_host, config.listen_port, config.admin_host,
            config.admin_port, config.workers, config.data_dir, registries,
        )  # fmt: skip

    try:
        if config.workers > 1:
            return supervise(config, argv, announce)
        uvloop.run(run(config, tls, ready=announce))
    except (ListenError, IndexOpenError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    return 0


def _admin_parent() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin", default=os.environ.get("MIRROR_ADMIN_URL", "http://127.0.0.1:5001"),
        help="the running mirror's admin API (default http://127.0.0.1:5001)",
    )  # fmt: skip
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def _add_operator_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    admin = _admin_parent()
    pre = sub.add_parser("prefetch", help="pull images into a running mirror")
    pre.add_argument("images", nargs="*", metavar="IMAGE", help="an image reference: alpine:3.19")
    pre.add_argument("-f", "--file", help="read image references from a file, one a line")
    pre.add_argument("--server", default="http://127.0.0.1:5000", help="the mirror's registry URL")
    pre.add_argument("--platform", help="only this platform of an index, e.g. linux/arm64")
    pre.add_argument("--json", action="store_true", help="machine-readable output")
    ls = sub.add_parser("ls", help="cached repositories and tags")
    ls.add_argument(
        "--data", default=os.environ.get("MIRROR_DATA", "./mirror-data"),
        help="the mirror's data directory (default ./mirror-data, env MIRROR_DATA)",
    )  # fmt: skip
    ls.add_argument(
        "--index", default=os.environ.get("MIRROR_INDEX"),
        help="a postgresql:// index instead of the data directory's (env MIRROR_INDEX; "
        "password from MIRROR_INDEX_PASSWORD or --index-password-file)",
    )  # fmt: skip
    ls.add_argument(
        "--index-password-file", dest="index_password_file",
        default=os.environ.get("MIRROR_INDEX_PASSWORD_FILE"),
        help="file holding the PostgreSQL password",
    )  # fmt: skip
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("stats", parents=[admin], help="disk use, counts, hits and bandwidth saved")
    for name, text in (("pin", "protect an image from eviction"), ("unpin", "undo pin")):
        cmd = sub.add_parser(name, parents=[admin], help=text)
        cmd.add_argument("image", metavar="IMAGE", help="an image reference: alpine:3.19")
    purge = sub.add_parser("purge", parents=[admin], help="remove cached content now")
    purge.add_argument("image", nargs="?", metavar="IMAGE", help="an image reference: alpine:3.19")
    purge.add_argument("--unused-for", help="remove everything not used for this long (30d)")
    gc = sub.add_parser(
        "gc", parents=[admin], help="remove hosted content no manifest names any more"
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="only show what would go, and how many bytes"
    )
    gc.add_argument(
        "--grace", default="1h",
        help="spare blobs uploaded this recently that no manifest names yet: a push in "
        "progress (1h)",
    )  # fmt: skip


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_prefetch(args: argparse.Namespace) -> int:
    images = list(args.images)
    if args.file:
        lines = Path(args.file).read_text().splitlines()
        images += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not images:
        print("mirror prefetch: name at least one IMAGE or -f FILE", file=sys.stderr)
        return 2
    results = asyncio.run(prefetch(args.server, images, args.platform))
    if args.json:
        _print_json([r.__dict__ for r in results])
    else:
        for r in results:
            if r.error:
                print(f"{r.image}: FAILED: {r.error}")
            else:
                print(
                    f"{r.image}: {r.blobs} blobs, {human_bytes(r.total_bytes)} "
                    f"(fetched {human_bytes(r.fetched_bytes)}, "
                    f"already cached {human_bytes(r.cached_bytes)})"
                )
        fetched = sum(r.fetched_bytes for r in results)
        cached = sum(r.cached_bytes for r in results)
        print(f"total: fetched {human_bytes(fetched)}, already cached {human_bytes(cached)}")
    return 1 if any(r.error for r in results) else 0


async def _listing(opening: Awaitable[Index]) -> list[dict[str, object]]:
    index = await opening
    try:
        images = await index.images()
        for image in images:
            closure = await index.closure(str(image["digest"]))
            image["size"] = sum(closure.values())
        return images
    finally:
        await index.close()


def cmd_ls(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if args.index:
        try:
            config = load_config(
                {"data": args.data, "index": args.index,
                 "index_password_file": args.index_password_file},
                os.environ,
            )  # fmt: skip
        except ConfigError as exc:
            print(f"mirror ls: {exc}", file=sys.stderr)
            return 2
        opening: Awaitable[Index] = open_index(config)
    elif not (data / "index.db").exists():
        print(f"mirror ls: no cache at {data} (use --data, or --index)", file=sys.stderr)
        return 2
    else:
        opening = SqliteIndex.open(data / "index.db")
    images = asyncio.run(_listing(opening))
    if args.json:
        _print_json(images)
        return 0
    rows = [
        [
            # Hosted images by the name clients push and pull them by (no registry host).
            f"{routed_name(str(i['registry']), str(i['repository']))}:{i['tag']}"
            if i["registry"] == HOSTED
            else f"{i['registry']}/{i['repository']}:{i['tag']}",
            str(i["digest"])[:19],
            human_bytes(float(str(i["size"]))),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(float(str(i["last_access"])))),
            # Hosted images are kept until deleted: "hosted" says so, rather than "yes".
            "hosted" if i["registry"] == HOSTED else "yes" if i["pinned"] else "",
        ]
        for i in images
    ]
    _table(rows, ["IMAGE", "DIGEST", "SIZE", "LAST USED", "PINNED"])
    return 0


def _admin_call(
    args: argparse.Namespace, path: str, body: dict[str, object] | None
) -> dict[str, Any]:
    async def call() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            method = session.post if body is not None else session.get
            async with method(f"{args.admin.rstrip('/')}{path}", json=body) as resp:
                return resp.status, await resp.json(content_type=None)

    try:
        status, answer = asyncio.run(call())
    except aiohttp.ClientError as exc:
        raise SystemExit(f"mirror: cannot reach the admin API at {args.admin}: {exc}") from exc
    if status >= 400:
        error = answer.get("errors", [{}])[0]
        raise SystemExit(f"mirror: {error.get('code', status)}: {error.get('message', '')}")
    return answer


def cmd_stats(args: argparse.Namespace) -> int:
    s = _admin_call(args, "/admin/stats", None)
    if args.json:
        _print_json(s)
        return 0
    pct = 100 * s["disk_bytes"] / s["max_bytes"] if s["max_bytes"] else 0
    req = s["requests"]
    served = s["served_from_cache_bytes"] + s["served_from_upstream_bytes"]
    rows = [
        ["disk", f"{human_bytes(s['disk_bytes'])} of {human_bytes(s['max_bytes'])} ({pct:.1f}%)"],
        ["blobs", str(s["blobs"])],
        ["manifests", str(s["manifests"])],
        ["requests", ", ".join(f"{k} {int(v)}" for k, v in req.items())],
        ["served from cache", human_bytes(s["served_from_cache_bytes"])],
        ["served from upstream", human_bytes(s["served_from_upstream_bytes"])],
        ["fetched from upstream", human_bytes(s["fetched_from_upstream_bytes"])],
        ["bandwidth saved", f"{human_bytes(s['saved_bytes'])}"
         + (f" ({100 * s['saved_bytes'] / served:.1f}% of blob bytes served)" if served else "")],
        ["evicted", f"{int(s['evictions'])} blobs, {human_bytes(s['evicted_bytes'])}"],
    ]  # fmt: skip
    _table(rows, ["SINCE START", ""])
    return 0


def cmd_pin(args: argparse.Namespace, unpin: bool = False) -> int:
    answer = _admin_call(args, "/admin/unpin" if unpin else "/admin/pin", {"image": args.image})
    if args.json:
        _print_json(answer)
    elif unpin:
        print(f"{answer['image']}: {'unpinned' if answer['unpinned'] else 'was not pinned'}")
    else:
        print(
            f"{answer['image']}: pinned {answer['pinned_digests']} digests "
            f"({human_bytes(answer['bytes'])})"
        )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    if bool(args.image) == bool(args.unused_for):
        print("mirror purge: name an IMAGE or --unused-for DURATION", file=sys.stderr)
        return 2
    body: dict[str, object] = (
        {"image": args.image} if args.image else {"unused_for": args.unused_for}
    )
    answer = _admin_call(args, "/admin/purge", body)
    if args.json:
        _print_json(answer)
    else:
        tags = f"{answer['removed_tags']} tag(s), " if "removed_tags" in answer else ""
        print(
            f"removed {tags}{answer['removed_blobs']} blobs, {human_bytes(answer['removed_bytes'])}"
        )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    answer = _admin_call(args, "/admin/gc", {"dry_run": args.dry_run, "grace": args.grace})
    if args.json:
        _print_json(answer)
        return 0
    for digest in answer["digests"]:
        print(digest)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {answer['blobs']} blobs, {human_bytes(answer['bytes'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    commands = {
        "serve": lambda a: serve(a, argv[1:]),
        "prefetch": cmd_prefetch,
        "ls": cmd_ls,
        "stats": cmd_stats,
        "pin": cmd_pin,
        "unpin": lambda a: cmd_pin(a, unpin=True),
        "purge": cmd_purge,
        "gc": cmd_gc,
    }
    return int(commands[args.command](args))
