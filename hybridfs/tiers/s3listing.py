"""MinIO's ListObjectsV2 extension: user metadata in the listing, so `ls -l` needs no HEAD per entry.

With ``metadata=true`` in the query (MinIO's ``ListObjectsV2MHandler``, routed on ``list-type=2&metadata=true``),
each ``<Contents>`` carries ``<UserMetadata>`` (the object's headers: ``X-Amz-Meta-*`` and its content type; the
element is left out when there are none) and ``<Internal>`` (its erasure-code figures), the latter always, when
the caller may read the object. ``<Internal>`` is what proves that the metadata was looked at: an object with it
and no ``X-Amz-Meta-*`` has no user metadata at all, which is as good as a HEAD. AWS S3 and other stores ignore
the parameter (or refuse it): their listings carry neither element, and the mount then asks HEADs as before.

botocore knows neither the parameter nor the elements. The parameter is added to the URL before signing and the
raw XML is read after the call, only for calls made while ``asking()`` is active in the calling thread (a
listing runs in one worker thread; other threads share the client).
"""

from __future__ import annotations

import contextlib
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

_META_PREFIX = "x-amz-meta-"
KEY = "HybridfsMetadata"  # added to each parsed Contents entry: dict (proven, maybe empty), or None (unknown)


class MetadataListing:
    def __init__(self, client: Any) -> None:
        self._local = threading.local()
        events = getattr(getattr(client, "meta", None), "events", None)
        if events is not None:  # a real botocore client (unit tests may pass other objects)
            events.register("before-sign.s3.ListObjectsV2", self._ask)
            events.register("after-call.s3.ListObjectsV2", self._read)

    @contextlib.contextmanager
    def asking(self) -> Iterator[None]:
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = False

    def _asking(self) -> bool:
        return bool(getattr(self._local, "on", False))

    def _ask(self, request: Any, **_: Any) -> None:
        if self._asking():  # called once per attempt, on a request built afresh from the parameters
            request.url += ("&" if "?" in request.url else "?") + "metadata=true"

    def _read(self, http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        if not self._asking():
            return
        contents = parsed.get("Contents") or []
        found = metadata_of(http_response.content)
        if len(found) != len(contents):  # not the answer we can pair entry by entry: prove nothing
            return
        for entry, meta in zip(contents, found, strict=True):
            entry[KEY] = meta


def metadata_of(body: bytes) -> list[dict[str, str] | None]:
    """Per ``<Contents>`` of a ListObjectsV2 answer, in order: its user metadata (names lower-case, without the
    ``x-amz-meta-`` prefix, as a HEAD's), or None when the answer does not say (no ``<Internal>``)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return []
    found: list[dict[str, str] | None] = []
    for contents in root:
        if _local_name(contents.tag) != "Contents":
            continue
        meta: dict[str, str] | None = None
        for child in contents:
            name = _local_name(child.tag)
            if name == "Internal" and meta is None:
                meta = {}
            elif name == "UserMetadata":
                meta = meta or {}
                for item in child:
                    header = _local_name(item.tag).lower()
                    if header.startswith(_META_PREFIX):
                        meta[header[len(_META_PREFIX):]] = item.text or ""
        found.append(meta)
    return found


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]
