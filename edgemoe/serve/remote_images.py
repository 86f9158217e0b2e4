"""Fetching `http(s)://` image URLs for `edgemoe serve --allow-remote-images`, bounded.

Contract: `RemoteImages(max_bytes, timeout_s)(url)` returns the body's bytes, or raises an
`ApiError` (400) when the URL cannot be fetched, answers with an error status, is not an image
content type, or is larger than `max_bytes` (read no further than that). Redirects follow urllib's
defaults. Off unless the server is started with the flag: fetching makes the server a client of any
URL a caller names.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from edgemoe.serve.requests import bad_request

DEFAULT_MAX_BYTES = 20 << 20
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RemoteImages:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __call__(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": "edgemoe-serve"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (opt-in)
                kind = response.headers.get_content_type()
                if not kind.startswith("image/"):
                    raise bad_request(f"{url} is {kind}, not an image", "invalid_image")
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as exc:
            raise bad_request(f"fetching {url} failed: HTTP {exc.code}", "image_fetch_failed") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise bad_request(f"fetching {url} failed: {getattr(exc, 'reason', exc)}", "image_fetch_failed") from None
        if len(data) > self.max_bytes:
            raise bad_request(f"{url} is larger than {self.max_bytes} bytes", "image_too_large")
        return data
