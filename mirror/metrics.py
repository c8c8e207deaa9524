"""Every Prometheus metric object, defined once, named as the contract in the README says.

Labels never carry unbounded values (no repository, tag or digest): a mirror serves thousands
of repositories and each label value is a time series.

With `--workers N`, prometheus-client's multiprocess mode is on (the supervisor sets
PROMETHEUS_MULTIPROC_DIR before any worker imports this module): each worker writes its values
to files there and `/metrics` on any worker aggregates all of them. Gauges say how to combine.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector


def registry() -> CollectorRegistry:
    """What `/metrics` and the admin stats read: this process, or all workers together."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    combined = CollectorRegistry()
    MultiProcessCollector(combined, directory)  # type: ignore[no-untyped-call]
    return combined


CREDENTIALS_WITHHELD = Counter(
    "mirror_credentials_withheld_total",
    "Token requests made anonymously because the upstream named a realm outside its allowed hosts",
    ["registry"],
)
NEGATIVE_CACHE_HITS = Counter(
    "mirror_negative_cache_hits_total",
    "Requests answered 404 from the memory of a recent upstream 404, without asking upstream",
    ["registry"],
)

CACHE_BYTES = Gauge(
    "mirror_cache_bytes", "Bytes of verified content on disk", multiprocess_mode="mostrecent"
)
CACHE_MAX_BYTES = Gauge(
    "mirror_cache_max_bytes", "The configured size cap", multiprocess_mode="mostrecent"
)
# livemax, not max: a worker that died while its disk-full window was open must not hold the
# gauge at 1 (the supervisor drops a dead worker's live* files; plain max keeps them).
DISK_FULL = Gauge(
    "mirror_disk_full",
    "1 while a disk-full error has cache misses served from upstream without caching",
    multiprocess_mode="livemax",
)
EVICTIONS = Counter("mirror_evictions_total", "Blobs (layers, configs, manifests) evicted")
EVICTED_BYTES = Counter("mirror_evicted_bytes_total", "Bytes evicted")

REQUESTS = Counter(
    "mirror_requests_total",
    "Client requests by kind (manifest, blob, tags, other), method and cache result",
    ["kind", "method", "result"],
)
REQUEST_DURATION = Histogram(
    "mirror_request_duration_seconds",
    "Time to answer a client request, body included",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SERVED_BYTES = Counter(
    "mirror_served_bytes_total",
    "Blob bytes sent to clients: from the cache (disk, or another client's download), or "
    "from the upstream download this request started",
    ["source"],
)
SAVED_BYTES = Counter(
    "mirror_saved_bytes_total", "Blob bytes served to clients that did not cross the internet"
)
UPSTREAM_BYTES = Counter(
    "mirror_upstream_bytes_total", "Bytes received from upstream, resumed ranges included"
)

UPSTREAM_REQUESTS = Counter(
    "mirror_upstream_requests_total",
    "Requests to upstream registries (final status after redirects; 'error' for no answer)",
    ["registry", "kind", "method", "status"],
)
UPSTREAM_DURATION = Histogram(
    "mirror_upstream_request_duration_seconds",
    "Time until an upstream registry answered (response headers)",
    ["registry", "kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RATELIMIT_REMAINING = Gauge(
    "mirror_upstream_ratelimit_remaining",
    "Pulls left, from the upstream's ratelimit-remaining",
    ["registry"],
    multiprocess_mode="mostrecent",
)
RATELIMIT_LIMIT = Gauge(
    "mirror_upstream_ratelimit_limit",
    "Pull limit, from the upstream's ratelimit-limit",
    ["registry"],
    multiprocess_mode="mostrecent",
)
TOKEN_REQUESTS = Counter(
    "mirror_token_requests_total", "Requests to upstream token services", ["registry", "result"]
)
INFLIGHT_FETCHES = Gauge(
    "mirror_inflight_fetches",
    "Blob downloads from upstream in progress",
    multiprocess_mode="livesum",
)
COALESCED = Counter(
    "mirror_coalesced_requests_total",
    "Requests that joined a download or manifest fetch another request had started",
)
CACHE_BLOBS = Gauge(
    "mirror_cache_blobs",
    "Cached blobs (layers, configs and manifests)",
    multiprocess_mode="mostrecent",
)
CACHE_MANIFESTS = Gauge(
    "mirror_cache_manifests", "Cached manifests", multiprocess_mode="mostrecent"
)
DIGEST_MISMATCHES = Counter(
    "mirror_digest_mismatches_total",
    "Content that failed digest verification (discarded): upstream, or a bucket object",
)
UPSTREAM_RESUMES = Counter(
    "mirror_upstream_resumes_total", "Blob downloads resumed with Range after an interruption"
)
WEBHOOK_EVENTS = Counter(
    "mirror_webhook_events_total",
    "Webhook events by outcome: delivered, abandoned (retries spent), dropped (queue full)",
    ["event", "result"],
)
WEBHOOK_FAILURES = Counter(
    "mirror_webhook_delivery_failures_total",
    "Webhook delivery attempts that failed (no answer, or not 2xx); each is retried",
    ["event"],
)
BACKEND_DURATION = Histogram(
    "mirror_backend_duration_seconds",
    "Time of one storage backend operation (s3, postgresql) by operation, errors included",
    ["backend", "operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BACKEND_ERRORS = Counter(
    "mirror_backend_errors_total",
    "Storage backend operations that failed (unreachable, timed out, refused), by operation",
    ["backend", "operation"],
)
BACKEND_UP = Gauge(
    "mirror_backend_up",
    "1 while a storage backend (s3, postgresql) answers, 0 while misses are refused for it",
    ["backend"],
    multiprocess_mode="livemin",
)
HOSTED_BYTES = Gauge(
    "mirror_hosted_bytes",
    "Bytes of hosted content (pushed or mounted, counted once per digest) against hosted_max_size",
    multiprocess_mode="mostrecent",
)
HOSTED_RECEIVED_BYTES = Counter(
    "mirror_hosted_received_bytes_total", "Blob bytes received by pushes (uploads, not mounts)"
)
HOSTED_MOUNTS = Counter(
    "mirror_hosted_mounts_total", "Blobs mounted into a hosted repository instead of uploaded"
)
HOSTED_PUSHES = Counter("mirror_hosted_pushes_total", "Manifests pushed to hosted repositories")
HOSTED_DELETES = Counter(
    "mirror_hosted_deletes_total", "Manifests and tags deleted from hosted repositories"
)
HOSTED_GC_RUNS = Counter("mirror_hosted_gc_runs_total", "Garbage collections of hosted content")
HOSTED_GC_BYTES = Counter(
    "mirror_hosted_gc_bytes_total", "Bytes of hosted content no manifest named, freed by GC"
)
BUILD_INFO = Gauge(
    "mirror_build_info", "Always 1; the version as a label", ["version"], multiprocess_mode="max"
)


@functools.lru_cache(maxsize=128)
def observers(kind: str, method: str, result: str) -> tuple[Counter, Histogram]:
    """A request's labelled children, looked up once per label set rather than per request."""
    return REQUESTS.labels(kind, method, result), REQUEST_DURATION.labels(kind)


def upstream_kind(suffix: str) -> str:
    """`manifests/...` -> manifest, `blobs/...` -> blob, `tags/list` -> tags; bounded values."""
    head = suffix.split("/", 1)[0]
    return {"manifests": "manifest", "blobs": "blob", "tags": "tags"}.get(head, "other")
