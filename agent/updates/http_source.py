"""Bundles fetched from an HTTP(S) source with Range requests (an object store, a CDN, nginx, or
``edgepack fleet serve --http``), the way Mender, Greengrass and AWS IoT Jobs deliver artifacts.

The URL comes from the **signed** desired state; the bytes are trusted only after each chunk matches
its signed digest (:meth:`Download.write`), so a compromised server or CDN can slow an update down,
never change it. Only the chunks still missing are asked for (one ``Range`` per contiguous run), so
a download cut by the network, the server or a restart resumes where it stopped, across sources
too: the MQTT chunk path fills in whatever HTTP could not deliver.

Blocking :mod:`http.client` on one worker thread (no new dependency on the device; one persistent
connection per download; the event loop never waits on a socket).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

#: redirects followed at most (a CDN or an S3 endpoint may send one); https never goes to http
MAX_REDIRECTS = 3
#: chunks asked for in one Range at most: a stop or a supersede is seen between chunks anyway, and a
#: short range re-asks less after a cut
RUN_CHUNKS = 256
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


class SourceFailed(Exception):
    """This try of the source failed; ``fatal`` means trying it again will not help (404, a server
    that refuses the range, other bytes than signed), so the download goes on over MQTT."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.message = message
        self.fatal = fatal


class Stopped(Exception):
    """The download was stopped (superseded, past its deadline, the agent stopping)."""


def check_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL with a host; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


def runs(missing: list[int], limit: int = RUN_CHUNKS) -> list[tuple[int, int]]:
    """Contiguous runs ``(first, last)`` of the missing chunk indexes, each at most ``limit`` long."""
    found: list[tuple[int, int]] = []
    for index in missing:
        if found and found[-1][1] == index - 1 and index - found[-1][0] < limit:
            found[-1] = (found[-1][0], index)
        else:
            found.append((index, index))
    return found


class HttpSource:
    """One download's connection to ``url``; :meth:`fetch` delivers the chunks of a run."""

    def __init__(self, url: str, timeout_s: float = 20.0, ca_file: Path | None = None, device_id: str = ""):
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.ca_file = ca_file
        self.user_agent = f"edgepack-agent ({device_id})" if device_id else "edgepack-agent"
        self._connection: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int] | None = None
        #: bytes received over HTTP (all tries), for the download's progress and the benchmarks
        self.bytes = 0
        self.requests = 0
        self._sock = None

    def abort(self) -> None:
        """Wake a read blocked on the socket (from another thread): it fails at once."""
        # The socket of the request under way, not the connection's: for a ``Connection: close``
        # answer http.client hands the socket to the response and the connection's is None.
        sock = self._sock or getattr(self._connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if self._connection is None or self._origin != origin:
            self.close()
            if parts.scheme == "https":
                context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
                self._connection = http.client.HTTPSConnection(origin[1], origin[2], timeout=self.timeout_s,
                                                               context=context)
            else:
                self._connection = http.client.HTTPConnection(origin[1], origin[2], timeout=self.timeout_s)
            self._origin = origin
        path = parts.path or "/"
        return self._connection, path + (f"?{parts.query}" if parts.query else "")

    def _open(self, first_byte: int, last_byte: int) -> tuple[http.client.HTTPResponse, int]:
        """The response to ``Range: bytes=first-last`` (following redirects) and the offset its body
        starts at (0 when the server ignored the range and sends the whole file)."""
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                connection, path = self._connect(url)
            except (ValueError, TypeError, OSError) as exc:  # a redirect to a bad port or no host
                raise SourceFailed(f"{url}: cannot connect ({exc})", fatal=True) from None
            headers = {"Range": f"bytes={first_byte}-{last_byte}", "User-Agent": self.user_agent,
                       "Accept-Encoding": "identity"}
            try:
                connection.request("GET", path, headers=headers)
                self._sock = connection.sock
                response = connection.getresponse()
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise SourceFailed(f"{url}: the server's certificate is not trusted ({exc.verify_message}); "
                                   "set updates.http_ca_file", fatal=True) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise SourceFailed(f"{url}: {_describe(exc)}") from None
            self.requests += 1
            status = response.status
            if status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                target = urljoin(url, response.getheader("Location"))
                self.close()  # the redirect's body is not read: a fresh connection for the target
                if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                    raise SourceFailed(f"{url} redirects to {target}: not over https, refused", fatal=True)
                try:
                    check_url(target)
                except ValueError as exc:
                    raise SourceFailed(f"{url} redirects to {exc}", fatal=True) from None
                url = target
                continue
            if status == 206:
                match = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
                if not match or int(match.group(1)) != first_byte:
                    self.close()
                    raise SourceFailed(f"{url}: answered another range ({response.getheader('Content-Range')!r} "
                                       f"for bytes {first_byte}-{last_byte})", fatal=True)
                return response, first_byte
            if status == 200:
                return response, 0  # no Range support: the chunks before ours are read and dropped
            message = f"{url}: HTTP {status} {response.reason}".rstrip() + _explanation(response)
            self.close()  # the error body is not read to its end: the connection cannot carry another request
            raise SourceFailed(message, fatal=status not in (408, 425, 429, 500, 502, 503, 504))
        raise SourceFailed(f"{self.url}: more than {MAX_REDIRECTS} redirects", fatal=True)

    def fetch(self, first: int, last: int, chunk_bytes: int, size: int, deliver: Callable[[int, bytes], None],
              stop: threading.Event, wanted: Callable[[int], bool] | None = None) -> bool:
        """Fetch chunks ``first..last`` and hand each to ``deliver(index, data)`` as it completes.
        Raises :class:`SourceFailed` (what was delivered stays) or :class:`Stopped`.

        True when the server ignored the range and sent the whole file: then it is read to its end
        and every other chunk ``wanted(index)`` asks for is delivered too, so a server without Range
        support costs one pass over the file, not one per run of missing chunks."""
        first_byte, last_byte = first * chunk_bytes, min(size, (last + 1) * chunk_bytes) - 1
        response, offset = self._open(first_byte, last_byte)
        whole = response.status == 200
        end = (size - 1) // chunk_bytes if whole and wanted is not None else last
        try:
            index = offset // chunk_bytes
            while index <= end:
                if stop.is_set():
                    raise Stopped()
                want = min(chunk_bytes, size - index * chunk_bytes)
                try:
                    data = response.read(want)
                except (OSError, http.client.HTTPException) as exc:
                    raise SourceFailed(f"{self.url}: cut after {self.bytes} bytes ({_describe(exc)})") from None
                self.bytes += len(data)
                if len(data) != want:
                    raise SourceFailed(f"{self.url}: the body ended after chunk {index - 1} "
                                       f"({len(data)} of {want} bytes of chunk {index})")
                if first <= index <= last or (whole and wanted is not None and wanted(index)):
                    deliver(index, data)
                index += 1
            if not response.isclosed():
                self.close()  # bytes beyond the range (a whole-file answer): the connection is not reusable
        except BaseException:
            self.close()  # a connection with an unread body cannot carry the next request
            raise
        finally:
            self._sock = None
        return whole


def _explanation(response: http.client.HTTPResponse) -> str:
    """A short reason from an error body: an object store's ``<Code>``/``<Message>`` or a plain-text
    first line; nothing from an HTML page."""
    try:
        text = response.read(4096).decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return ""
    code, said = re.search(r"<Code>([^<]{1,80})</Code>", text), re.search(r"<Message>([^<]{1,200})</Message>", text)
    if code:
        return f" ({code.group(1)}{': ' + said.group(1) if said else ''})"
    kind = (response.getheader("Content-Type") or "").split(";")[0].strip()
    line = text.strip().splitlines()[0][:160] if text.strip() else ""
    return f" ({line})" if kind == "text/plain" and line else ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
