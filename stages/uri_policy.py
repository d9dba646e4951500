"""Which manifest URIs may be read, and how much of them: the input policy of the extract and train stages.

A manifest is input: whoever wrote it chooses every URL the pipeline fetches and every file it opens. A
:class:`UriPolicy` bounds that:

* **Schemes.** Only ``allowed_schemes`` (default ``file``, ``s3``, ``gs``, ``idx``) are read; a plain local path counts
  as ``file``; ``local``, ``s3a`` and ``gcs`` are aliases of ``file``, ``s3`` and ``gs``. Every part of a chained fsspec
  URL (``a::b``) must be allowed.
* **Addresses.** Whatever the schemes, a URL naming a host may not name a link-local or cloud-metadata address:
  169.254.0.0/16, fe80::/10, fd00:ec2::254, 100.100.100.200, IPv4-mapped forms of these, numeric spellings that
  resolve to them (``2852039166``, ``0xa9fea9fe``), or a metadata host name (``metadata.google.internal``, …).
  Host names are not resolved: a DNS name that points at a metadata address is not caught here.
* **Bytes.** An encoded image may hold at most ``max_image_bytes``; reads stop after that many bytes (plus one), so a
  huge or endless source costs at most that much. Local paths must be regular files (a device, FIFO or directory is
  never read).
* **Pixels.** A decoded image may have at most ``max_image_pixels`` (checked on the header, before any pixel is
  decoded); Pillow's own bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top.
* **IDX files.** An IDX file may declare (and, gzip-compressed, inflate to) at most ``max_idx_bytes``; its gzip
  stream is inflated only as far as its header says it holds.

A URI the policy refuses raises :class:`UriPolicyError` (a :class:`ValueError` naming the URI and the setting). The
config's ``data`` section sets the policy (``data.allowed_schemes``, ``data.max_image_bytes``, …).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, fields
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

DEFAULT_SCHEMES = ("file", "s3", "gs", "idx")
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS
DEFAULT_MAX_IDX_BYTES = 2**30
SCHEME_ALIASES = {"local": "file", "s3a": "s3", "gcs": "gs"}
# Schemes whose authority is a bucket or nothing, never a network host.
_HOSTLESS = frozenset({"file", "idx", "s3", "gs", "az", "abfs", "abfss", "adl", "memory"})
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
     "metadata.azure.com", "metadata.tencentyun.com"}
)
METADATA_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$")


class UriPolicyError(ValueError):
    """A manifest URI the input policy refuses; ``uri`` is the URI, ``setting`` the policy field that refused it."""

    def __init__(self, uri: str, setting: str, message: str) -> None:
        super().__init__(f"{uri}: {message} (data.{setting})")
        self.uri, self.setting, self.message = uri, setting, message

    def __reduce__(self):
        """Pickle by constructor arguments, so the error crosses process boundaries (Ray, DataLoader)."""
        return (UriPolicyError, (self.uri, self.setting, self.message))


@dataclass(frozen=True)
class UriPolicy:
    """The input policy (module docstring); field names match the config's ``data`` section.

    Attributes:
        allowed_schemes: URI schemes that may be read (normalised: lower case, aliases resolved).
        max_image_bytes: largest encoded image, in bytes.
        max_image_pixels: largest decoded image, width × height.
        max_idx_bytes: largest IDX file, in (uncompressed) bytes.
    """

    allowed_schemes: tuple[str, ...] = DEFAULT_SCHEMES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_idx_bytes: int = DEFAULT_MAX_IDX_BYTES

    def __post_init__(self) -> None:
        schemes = []
        for raw in self.allowed_schemes:
            name = str(raw).strip().lower().removesuffix("://")
            if not _SCHEME.match(name):
                raise ValueError(f"data.allowed_schemes: {raw!r} is not a URI scheme (e.g. 'file', 's3')")
            schemes.append(SCHEME_ALIASES.get(name, name))
        object.__setattr__(self, "allowed_schemes", tuple(dict.fromkeys(schemes)))
        for name in ("max_image_bytes", "max_image_pixels", "max_idx_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}: expected a positive integer, got {value!r}")

    @classmethod
    def of(cls, section: Any) -> UriPolicy:
        """The policy of a config section (any object with this class's field names as attributes)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

    def check(self, uri: str) -> None:
        """Refuse ``uri`` unless every part of it has an allowed scheme and no part names a metadata address.

        Raises:
            UriPolicyError: naming the URI, the scheme or host, and the setting.
        """
        uri = str(uri)
        parts = uri.split("::")
        for part in parts:
            scheme = _chain_scheme(part) if len(parts) > 1 else scheme_of(part)
            if scheme not in self.allowed_schemes:
                raise UriPolicyError(uri, "allowed_schemes", f"scheme {scheme!r} is not allowed (allowed: "
                                                             f"{', '.join(self.allowed_schemes)})")
        # The whole URI too: "::" also occurs inside an IPv6 address, where splitting on it breaks the host apart.
        for candidate in dict.fromkeys([uri, *parts]):
            if scheme_of(candidate) in _HOSTLESS:
                continue
            host = _host(candidate)
            if host is not None and is_metadata_host(host):
                raise UriPolicyError(uri, "allowed_schemes", f"host {host!r} is a link-local or cloud-metadata "
                                                             "address, never read")


DEFAULT_POLICY = UriPolicy()


def scheme_of(uri: str) -> str:
    """The normalised scheme of ``uri``: ``file`` for plain paths, aliases resolved (``s3a`` → ``s3``)."""
    scheme, sep, _ = str(uri).partition("://")
    if not sep:
        return "file"
    name = scheme.lower()
    return SCHEME_ALIASES.get(name, name)


def _chain_scheme(part: str) -> str:
    """The scheme of one part of a chained fsspec URL: as fsspec reads it, a bare protocol-like word is a protocol
    (``simplecache`` in ``simplecache::s3://b/k``)."""
    if "://" in part:
        return scheme_of(part)
    name = part.strip().lower()
    return SCHEME_ALIASES.get(name, name) if _SCHEME.match(name) else "file"


def _host(uri: str) -> str | None:
    try:
        host = urlsplit(uri).hostname
    except ValueError:  # malformed authority, e.g. an unclosed IPv6 bracket
        return uri.partition("://")[2].split("/", 1)[0]
    return None if host is None else unquote(host).rstrip(".").lower()


def is_metadata_host(host: str) -> bool:
    """Whether ``host`` (a name or an address in any notation) is a link-local or cloud-metadata address."""
    host = unquote(host).strip("[]").rstrip(".").lower()
    if host in METADATA_HOSTS:
        return True
    address = _as_address(host)
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in METADATA_NETWORKS if net.version == address.version)


def _as_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, also in the legacy numeric forms resolvers accept (``2852039166``, ``0xa9.254.1``)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


# ------------------------------------------------------------------------------------------ bounded local reads
class LocalRead(NamedTuple):
    """What :func:`read_local` found: ``data`` (at most ``limit + 1`` bytes), the file's ``size`` and ``mtime``, and
    ``not_regular``: a description when the path is not a regular file (then nothing was read)."""

    data: bytes
    size: int
    mtime: float
    not_regular: str | None = None


def read_local(path: str, limit: int) -> LocalRead:
    """Read at most ``limit + 1`` bytes of the regular file ``path``, without blocking on a FIFO or a device.

    A file whose size is already over ``limit`` is not read at all (``data`` is empty, ``size`` says why).

    Raises:
        FileNotFoundError: the path does not exist (also when a component of it is not a directory).
        PermissionError: the file cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except NotADirectoryError as err:
        raise FileNotFoundError(err.errno, f"a component of the path is not a directory: {path}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return LocalRead(b"", 0, st.st_mtime, f"not a regular file ({_kind(st.st_mode)})")
        if st.st_size > limit:
            return LocalRead(b"", st.st_size, st.st_mtime)
        parts, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return LocalRead(b"".join(parts), st.st_size, st.st_mtime)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
