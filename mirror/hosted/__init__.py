"""The team's own repositories beside the cache: hosted namespaces (`[hosted."acme"]`), pushed
to and served by the mirror, never fetched upstream and never evicted by the cache's LRU.

access.py says who may push and pull; uploads.py keeps blob upload sessions on disk;
repository.py stores and reads hosted content through the same content and index seams as
the cache; handlers.py speaks the distribution-spec push API.
"""
