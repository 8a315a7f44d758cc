"""Which IP addresses the server may call (the webhook SSRF guard). Torch-free, no I/O.

An IPv6 address can carry an IPv4 address inside it, and a gateway (NAT64, a 6to4 or Teredo relay)
or the host's own stack then delivers the packets to that IPv4 address: `64:ff9b::a9fe:a9fe` is
169.254.169.254 (a cloud metadata service) behind a NAT64 gateway. `ipaddress` calls many of these
forms global, so they are judged here by the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress

# RFC 6052's well-known NAT64 prefix: the IPv4 address is the last 32 bits.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215's local-use NAT64 prefix: not globally reachable (IANA), and where the IPv4 address sits
# inside it depends on the prefix length each network chose (RFC 6052, /48 to /96), so it cannot be
# read reliably: refused whole.
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
# IPv4-compatible addresses (RFC 4291, deprecated): `::a.b.c.d`, the last 32 bits.
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address carries (None: it carries none)."""
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return [ip.ipv4_mapped]
    if ip in IPV4_COMPATIBLE or ip in NAT64_WELL_KNOWN:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    if ip.sixtofour is not None:  # 2002:AABB:CCDD::/48 -> AA.BB.CC.DD
        return [ip.sixtofour]
    if ip.teredo is not None:  # 2001:0:<server>:<flags>:<port>:<client XOR 0xffffffff>
        server, client = ip.teredo  # `ipaddress` undoes the client's XOR
        return [server, client]
    return None


def is_public_address(text: str) -> bool:
    """True if `text` is an IP address the server may call: one that reaches the public internet.

    The rules, in order:

    1. Not an IP address (or a scoped one that does not parse): refused.
    2. `64:ff9b:1::/48` (local-use NAT64): refused (not globally reachable; its IPv4 position varies).
    3. IPv6 forms that carry IPv4 addresses are judged by those addresses alone, and every one must
       pass rule 4: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d` (so `::7f00:1` is
       127.0.0.1; `::` and `::1` carry 0.0.0.0 and 0.0.0.1), NAT64 `64:ff9b::/96`, 6to4 `2002::/16`
       (bits 16-47), Teredo `2001::/32` (the server address and the client address, which the form
       stores XOR 0xffffffff).
    4. Any other address: `ipaddress`'s `is_global` (not private, loopback, link-local, shared
       100.64.0.0/10, documentation or reserved space) and not multicast.
    """
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:  # fe80::1%eth0: only link-local addresses carry a zone
            return False
        if ip in NAT64_LOCAL_USE:
            return False
        carried = embedded_ipv4(ip)
        if carried is not None:
            return all(_global(v4) for v4 in carried)
    return _global(ip)


def _global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast
