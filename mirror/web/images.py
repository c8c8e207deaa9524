"""What an image is made of, as the web page shows it: platforms, layers, sizes, sharing.

Parsing manifest and config JSON is pure; the async builders read the index and the store.
Content is immutable per digest, so what is parsed from it is remembered (bounded) and a
page of 50 images costs 50 dictionary lookups once warm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from cachetools import LRUCache

from mirror.jsondoc import parse_json
from mirror.mediatypes import INDEX_TYPES
from mirror.store.blobs.base import ContentStore
from mirror.store.index import ImageRow, Index

SHARED_NAMES_SHOWN = 5
Visible = Callable[[str, str], bool]  # may (registry, repository) be named to this viewer?


def _everything(_registry: str, _repository: str) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str
    size: int
    media_type: str
    cached: bool
    shared_with: int = 0  # other cached tags whose images name this layer
    shared_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PlatformImage:
    platform: str  # linux/arm64/v8, or "" when unknown
    digest: str
    size: int  # of the manifest, as the index names it
    cached: bool
    config: Layer | None = None
    layers: tuple[Layer, ...] = ()


@dataclass(frozen=True, slots=True)
class ListedImage:
    row: ImageRow
    platforms: tuple[str, ...]
    size: int  # manifest(s), configs and layers the index knows of


@dataclass(frozen=True, slots=True)
class ImageDetail:
    registry: str
    repository: str
    digest: str
    media_type: str
    size: int
    last_access: float
    pinned: bool
    tags: tuple[str, ...]
    images: tuple[PlatformImage, ...]  # one for a single-platform image


def _document(data: bytes | None) -> dict[str, object]:
    if data is None:
        return {}
    try:
        doc = parse_json(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def platform_label(platform: object) -> str:
    """`{"os": "linux", "architecture": "arm64", "variant": "v8"}` -> `linux/arm64/v8`."""
    if not isinstance(platform, dict):
        return ""
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(str(p) for p in parts if isinstance(p, str) and p)


def index_entries(data: bytes) -> list[tuple[str, str, int]]:
    """(platform, digest, size) of an index's manifests; attestations are named as such."""
    entries = _document(data).get("manifests")
    found: list[tuple[str, str, int]] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        label = platform_label(entry.get("platform"))
        annotations = entry.get("annotations")
        if isinstance(annotations, dict) and "vnd.docker.reference.type" in annotations:
            label = "attestation"  # buildkit's provenance/SBOM entries carry unknown/unknown
        size = entry.get("size")
        found.append((label, entry["digest"], size if isinstance(size, int) else 0))
    return found


def manifest_parts(data: bytes) -> tuple[tuple[str, int, str] | None, list[tuple[str, int, str]]]:
    """(digest, size, media type) of an image manifest's config, and of its layers in order."""
    doc = _document(data)

    def part(entry: object) -> tuple[str, int, str] | None:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            return None
        size, media_type = entry.get("size"), entry.get("mediaType")
        return (
            entry["digest"],
            size if isinstance(size, int) else 0,
            media_type if isinstance(media_type, str) else "",
        )

    layers = doc.get("layers")
    found = [p for p in (part(e) for e in (layers if isinstance(layers, list) else [])) if p]
    return part(doc.get("config")), found


class ImageViews:
    def __init__(self, index: Index, content: ContentStore) -> None:
        self._index = index
        self._content = content
        self._platforms: LRUCache[str, tuple[str, ...]] = LRUCache(50_000)

    async def listed(self, rows: list[ImageRow]) -> list[ListedImage]:
        return [
            ListedImage(
                row,
                await self._platforms_of(row.digest, row.media_type),
                sum((await self._index.closure(row.digest)).values()),
            )
            for row in rows
        ]

    async def _platforms_of(self, digest: str, media_type: str) -> tuple[str, ...]:
        known = self._platforms.get(digest)
        if known is not None:
            return known
        data = await self._content.read(digest)
        if data is None:
            return ()  # evicted meanwhile; not remembered
        if media_type in INDEX_TYPES:
            labels = [label for label, _, _ in index_entries(data) if label != "attestation"]
        else:
            config, _ = manifest_parts(data)
            labels = [await self._config_platform(config[0])] if config else []
        found = tuple(dict.fromkeys(label for label in labels if label))
        self._platforms[digest] = found
        return found

    async def _config_platform(self, digest: str) -> str:
        return platform_label(_document(await self._content.read(digest)))

    async def detail(
        self, registry: str, repository: str, digest: str, visible: Visible = _everything
    ) -> ImageDetail | None:
        """The image `digest` as cached for this repository (None unless a manifest of this
        repository is it: a digest cached for another repository is not this one's to show).
        `visible` decides which other repositories may be named as sharing its layers."""
        if await self._index.get_manifest_type(registry, repository, digest) is None:
            return None
        blob = await self._index.blob_row(digest)
        data = await self._content.read(digest)
        if blob is None or data is None:
            return None
        size, media_type, last_access = blob
        closure = await self._index.closure(digest)
        own = set(closure)
        if media_type in INDEX_TYPES:
            images = [
                await self._platform_image(label, child, child_size, own, visible)
                for label, child, child_size in index_entries(data)
            ]
        else:
            images = [await self._platform_image("", digest, size, own, visible, data)]
        if images and not images[0].platform and images[0].config is not None:
            images[0] = replace(
                images[0], platform=await self._config_platform(images[0].config.digest)
            )
        tags = await self._index.tags_of(registry, repository, digest)
        return ImageDetail(
            registry, repository, digest, media_type, sum(closure.values()), last_access,
            await self._index.is_pinned(digest), tuple(tags), tuple(images),
        )  # fmt: skip

    async def _platform_image(
        self, label: str, digest: str, size: int, own: set[str], visible: Visible,
        data: bytes | None = None,
    ) -> PlatformImage:  # fmt: skip
        data = data if data is not None else await self._content.read(digest)
        if data is None:
            return PlatformImage(label, digest, size, cached=False)
        config, layers = manifest_parts(data)
        return PlatformImage(
            label, digest, size, cached=True,
            config=await self._layer(config, own, visible) if config else None,
            layers=tuple([await self._layer(layer, own, visible) for layer in layers]),
        )  # fmt: skip

    async def _layer(self, part: tuple[str, int, str], own: set[str], visible: Visible) -> Layer:
        digest, size, media_type = part
        cached = await self._index.blob_row(digest) is not None
        names = [
            f"{registry}/{repository}:{tag}"
            for registry, repository, tag in await self._index.tags_sharing(digest, own)
            if visible(registry, repository)
        ]
        return Layer(
            digest, size, media_type, cached, len(names), tuple(names[:SHARED_NAMES_SHOWN])
        )
