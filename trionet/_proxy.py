"""The PROXY protocol header (versions 1 and 2), sans I/O.

A load balancer in TCP mode (haproxy, nginx's stream module, AWS NLB) opens
its own connection to the service, so the service sees the balancer's
address for every client. With the PROXY protocol the balancer first sends
one header naming the client's real address, then relays the client's
bytes unchanged (TLS included). The format is haproxy's specification
(``doc/proxy-protocol.txt``):

* version 1, text: ``PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\\r\\n``
  (``TCP6`` for IPv6, ``UNKNOWN`` when the balancer does not know), at most
  107 bytes;
* version 2, binary: a 12-byte signature, a version/command byte, a
  family/protocol byte, a 2-byte length, the addresses and ports, then
  optional type-length-value fields (ignored here). Command ``LOCAL`` is
  the balancer's own health check: the connection's address stands.

:func:`parse_proxy_header` looks at the bytes received so far and says
"need more", "here is the header and its length", or raises at the first
byte that cannot belong to a valid header (a client speaking anything else
is turned away after one read, not after a timeout). Bounded: a version 2
header with more than :data:`MAX_V2_PAYLOAD` bytes of addresses and
fields is refused, so nothing buffers more than :data:`MAX_HEADER` bytes.
Which sources may send a header at all is the caller's business
(:func:`parse_networks`, :func:`address_allowed`).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Final

import attrs

__all__ = [
    "MAX_HEADER",
    "MAX_V2_PAYLOAD",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "address_allowed",
    "parse_networks",
    "parse_proxy_header",
]

V1_PREFIX: Final = b"PROXY "
#: The longest version 1 header, CRLF included.
V1_MAX: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16
#: The most bytes of addresses and TLV fields accepted after a version 2
#: header's fixed part (the format allows 65535; balancers send a few dozen).
MAX_V2_PAYLOAD: Final = 2048
#: No header is longer than this.
MAX_HEADER: Final = _V2_FIXED + MAX_V2_PAYLOAD

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header: the message says why."""


@attrs.frozen
class ProxyHeader:
    """A parsed header.

    ``source`` and ``destination`` are ``(ip, port)``, or ``None`` when the
    header carries no usable address (v1 ``UNKNOWN``, v2 ``LOCAL``, a
    family other than TCP over IPv4/IPv6): the connection's own address
    then stands. ``length`` is how many bytes the header took; what follows
    is the client's.
    """

    version: int
    length: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None

    @property
    def peer(self) -> str | None:
        """The source as the logs show a peer: ``ip:port``, ``[ipv6]:port`` (or ``None``)."""
        if self.source is None:
            return None
        host, port = self.source
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_proxy_header(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``; ``None`` if more bytes are needed.

    Raises :class:`ProxyProtocolError` as soon as ``data`` cannot start a
    valid header. Bytes after the header are not looked at.
    """
    if not data:
        return None
    if data[:1] == b"P":
        return _parse_v1(bytes(data[:V1_MAX]))
    if data[:1] == b"\r":
        return _parse_v2(bytes(data[:MAX_HEADER]))
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyProtocolError("no PROXY protocol header")
    end = data.find(b"\r\n")
    if end < 0:
        if b"\n" in data:
            raise ProxyProtocolError("version 1 header: a line feed without a carriage return")
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"version 1 header longer than {V1_MAX} bytes")
        return None
    length = end + 2
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("version 1 header: not ASCII") from None
    words = line.split(" ")
    if len(words) < 2:
        raise ProxyProtocolError("version 1 header: no protocol")
    if words[1] == "UNKNOWN":
        return ProxyHeader(1, length, None, None)
    if words[1] not in ("TCP4", "TCP6") or len(words) != 6:
        raise ProxyProtocolError(f"version 1 header: expected TCP4, TCP6 or UNKNOWN: {line!r}")
    version = 4 if words[1] == "TCP4" else 6
    source = (_v1_address(words[2], version), _v1_port(words[4]))
    destination = (_v1_address(words[3], version), _v1_port(words[5]))
    return ProxyHeader(1, length, source, destination)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"version 1 header: bad address {text!r}") from None
    if address.version != version:
        raise ProxyProtocolError(f"version 1 header: {text} is not an IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii()) or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError(f"version 1 header: bad port {text!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProxyProtocolError("no PROXY protocol header")
    if len(data) < _V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"version 2 header: unknown version {version}")
    if command not in (0, 1):
        raise ProxyProtocolError(f"version 2 header: unknown command {command}")
    family, protocol = data[13] >> 4, data[13] & 0x0F
    (size,) = struct.unpack_from("!H", data, 14)
    if size > MAX_V2_PAYLOAD:
        raise ProxyProtocolError(
            f"version 2 header: {size} bytes of addresses and fields is too many"
        )
    length = _V2_FIXED + size
    if len(data) < length:
        return None
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyHeader(2, length, None, None)
    payload = data[_V2_FIXED:length]
    if protocol == 1 and family in (1, 2):  # TCP over IPv4 or IPv6
        width = 4 if family == 1 else 16
        if size < 2 * width + 4:
            raise ProxyProtocolError("version 2 header: addresses cut short")
        make = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
        src, dst = make(payload[:width]), make(payload[width : 2 * width])
        sport, dport = struct.unpack_from("!HH", payload, 2 * width)
        return ProxyHeader(2, length, (str(src), sport), (str(dst), dport))
    # UNSPEC, UNIX, UDP: valid, but no TCP client address to use.
    return ProxyHeader(2, length, None, None)


def parse_networks(text: str | Iterable[str | Network]) -> tuple[Network, ...]:
    """``"127.0.0.0/8,::1"`` (or a list of such, or of networks) as networks.

    A bare address is a /32 or /128. Raises :class:`ValueError` naming the
    entry that is not an address or network.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    networks: list[Network] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(item)
            continue
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR network: {item!r}") from None
    if not networks:
        raise ValueError("no address or network given")
    return tuple(networks)


def address_allowed(host: str | None, networks: Iterable[Network]) -> bool:
    """True if ``host`` (an IP address as text; ``[v6]`` brackets allowed) is in ``networks``."""
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
