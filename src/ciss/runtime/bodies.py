"""Reading request bodies within limits, and the one error type every endpoint answers with."""

from __future__ import annotations

import zlib


class HttpError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (4xx: the client's fault)."""

    def __init__(self, status: int, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes.

    ``Content-Encoding: gzip`` / ``deflate`` bodies (``tritonclient``'s compression options)
    are inflated with the same limit applied to the inflated size (zip bombs).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise HttpError(413, f"body of {declared} bytes exceeds the limit of {limit}",
                            "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads declare no length: count as they arrive
            raise HttpError(413, f"body exceeds the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HttpError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)",
                        "unsupported")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HttpError(400, f"body is not valid {encoding} data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise HttpError(413, f"inflated body exceeds the limit of {limit} bytes", "too_large")
    return out
