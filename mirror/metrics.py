"""Every Prometheus metric object, defined once, named as the contract in the README says.

Labels never carry unbounded values (no repository, tag or digest): a mirror serves thousands
of repositories and each label value is a time series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

CACHE_BYTES = Gauge("mirror_cache_bytes", "Bytes of verified content on disk")
CACHE_MAX_BYTES = Gauge("mirror_cache_max_bytes", "The configured size cap")
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
