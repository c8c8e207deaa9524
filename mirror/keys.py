"""Typed keys: the long-lived objects on the aiohttp Application, and what a request carries
from its handler to the middlewares and the access log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from mirror.access import AccessTracker
from mirror.clientauth import ClientAuth
from mirror.config import Config
from mirror.evict import Evictor
from mirror.fetch import BlobFetcher
from mirror.manifests import ManifestResolver
from mirror.membership import BlobMembership
from mirror.reference import Route
from mirror.referrers import ReferrerLists
from mirror.store.blobs import BlobStore
from mirror.store.blobs.base import ContentStore
from mirror.store.health import BackendHealth
from mirror.store.index import Index
from mirror.tags import TagLists
from mirror.traffic import TrafficRecorder
from mirror.upstream.client import RegistryClient
from mirror.visibility import Visibility
from mirror.web.images import ImageViews

if TYPE_CHECKING:
    from mirror.hosted.handlers import HostedRegistry

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", BlobStore)  # the local files (also the bucket's hot tier)
CONTENT = web.AppKey("content", ContentStore)  # where verified content lives for good
HEALTH = web.AppKey("health", BackendHealth)  # are the bucket and the database answering
INDEX = web.AppKey("index", Index)
UPSTREAMS = web.AppKey("upstreams", dict[str, RegistryClient])
FETCHER = web.AppKey("fetcher", BlobFetcher)
RESOLVER = web.AppKey("resolver", ManifestResolver)
EVICTOR = web.AppKey("evictor", Evictor)
ACCESS = web.AppKey("access", AccessTracker)
VISIBILITY = web.AppKey("visibility", Visibility)
TRAFFIC = web.AppKey("traffic", TrafficRecorder)
VIEWS = web.AppKey("views", ImageViews)
CLIENT_AUTH = web.AppKey("client_auth", ClientAuth)
TAG_LISTS = web.AppKey("tag_lists", TagLists)
REFERRERS = web.AppKey("referrers", ReferrerLists)
MEMBERSHIP = web.AppKey("membership", BlobMembership)
# Only with hosted namespaces configured (hosted/): absent, every name is the cache's.
# (Typed by annotation: hosted/handlers.py sends responses, whose module needs this one.)
HOSTED_REGISTRY: web.AppKey[HostedRegistry] = web.AppKey("hosted_registry")

# Set by the handlers. Manifest and blob requests have a cache result (hit, miss, stale,
# coalesced), tag lists too (miss, stale); `/v2/`, `_catalog`, the web page and the probes touch
# no cache and have none.
CACHE_RESULT = web.RequestKey("cache_result", str)
ROUTE = web.RequestKey("route", Route)  # a parsed /v2/ path, for the request's metric kind
STARTED = web.RequestKey("started", bool)  # headers sent: an error can only drop the connection
