"""Typed keys for the long-lived objects that live on the aiohttp Application."""

from __future__ import annotations

from aiohttp import web

from mirror.access import AccessTracker
from mirror.clientauth import ClientAuth
from mirror.config import Config
from mirror.evict import Evictor
from mirror.fetch import BlobFetcher
from mirror.manifests import ManifestResolver
from mirror.store.blobs import BlobStore
from mirror.store.index import Index
from mirror.traffic import TrafficRecorder
from mirror.upstream.client import RegistryClient
from mirror.visibility import Visibility
from mirror.web.images import ImageViews

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", BlobStore)
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
