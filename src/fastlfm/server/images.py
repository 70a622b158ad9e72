"""Images of chat requests: OpenAI ``image_url`` parts to encoded image bytes.

``data:`` URLs with a base64 payload are decoded in place. Remote ``http(s)`` URLs are
refused unless the server was started with ``--allow-remote-images``: fetching makes the
server request any address a client names, from the server's own network, so it is the
operator's choice. Fetches are bounded in size (``max_image_bytes``, checked against
Content-Length and while streaming) and in time (``fetch_timeout`` for the whole
download, redirects included). Every failure is a 400 that names the content part.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .errors import bad_request

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = 10.0
_MAX_REDIRECTS = 3


@dataclass
class ImagePolicy:
    allow_remote: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<media type>];base64,<payload>`` URL, or a 400 naming the part."""
    from ..models.lfm2_vl_processing import data_uri_bytes

    try:
        return data_uri_bytes(url, max_bytes)
    except ValueError as e:
        raise bad_request(f"{e} ({param})", param=param) from None


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def check_url(url: str, param: str, policy: ImagePolicy) -> None:
    """Refuse what will not be loaded, before any work: unknown schemes, remote URLs when off."""
    if url[:5].lower() == "data:":
        return
    if is_remote(url):
        if not policy.allow_remote:
            raise bad_request(f"Remote image URLs are not fetched by this server ({param}); send the image as a "
                              "base64 data: URL, or start the server with --allow-remote-images to enable fetching",
                              param=param, code="remote_images_disabled")
        return
    scheme = url.partition(":")[0] if ":" in url else url[:16]
    raise bad_request(f"Unsupported image URL in {param} ({scheme!r}...): send a base64 data: URL"
                      + (" or an http(s) URL" if policy.allow_remote else ""), param=param)


async def fetch_image(url: str, param: str, policy: ImagePolicy) -> bytes:
    """Download a remote image within the policy's size and time limits."""
    try:
        return await asyncio.wait_for(_download(url, param, policy.max_bytes), policy.fetch_timeout)
    except asyncio.TimeoutError:
        raise bad_request(f"Fetching the image of {param} took longer than {policy.fetch_timeout:g}s: {url[:200]}",
                          param=param, code="image_fetch_failed") from None


async def _download(url: str, param: str, max_bytes: int) -> bytes:
    import httpx

    too_large = bad_request(f"The image at {url[:200]} ({param}) is larger than the server's limit of "
                            f"{max_bytes} bytes", param=param, code="image_too_large")
    try:
        async with httpx.AsyncClient(follow_redirects=True, max_redirects=_MAX_REDIRECTS) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_request(f"Fetching the image of {param} failed: HTTP {response.status_code} from "
                                      f"{url[:200]}", param=param, code="image_fetch_failed")
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise too_large
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise too_large
                return bytes(data)
    except httpx.HTTPError as e:
        raise bad_request(f"Fetching the image of {param} failed: {type(e).__name__}: {e} ({url[:200]})",
                          param=param, code="image_fetch_failed") from None


def open_image(raw: bytes, param: str):
    """Decode image bytes (any format Pillow reads) into an RGB image, or a 400."""
    from ..models.lfm2_vl_processing import load_image

    try:
        return load_image(raw)
    except ValueError as e:
        raise bad_request(f"Invalid image in {param}: {e}", param=param, code="invalid_image") from None
