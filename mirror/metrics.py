"""Every Prometheus metric object, defined once, named as the contract in the README says.

Labels never carry unbounded values (no repository, tag or digest): a mirror serves thousands
of repositories and each label value is a time series.
"""

from __future__ import annotations

from prometheus_client import Counter

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
