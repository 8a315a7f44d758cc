"""The webhook SSRF guard's address rule (`patchdiff_core.service.addresses`), including IPv6 forms
that carry an IPv4 address, and its use at submit and at delivery time (`webhooks.check_addresses`)."""

from __future__ import annotations

import ipaddress

import pytest

from patchdiff_core.service.addresses import embedded_ipv4, is_public_address


def teredo(server: str, client: str, flags: int = 0x8000, port: int = 40000) -> str:
    """A Teredo address (RFC 4380): 2001:0:<server>:<flags>:<port XOR ffff>:<client XOR ffffffff>."""
    value = (0x2001_0000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | (flags << 48) \
        | ((port ^ 0xFFFF) << 32) | (int(ipaddress.IPv4Address(client)) ^ 0xFFFF_FFFF)
    return str(ipaddress.IPv6Address(value))


REFUSED = [
    # plain IPv4 and IPv6 that are not public
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "255.255.255.255", "224.0.0.1", "192.0.2.1", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12::1",
    "ff02::1", "2001:db8::1",
    # IPv4-mapped
    "::ffff:127.0.0.1", "::ffff:7f00:1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    # IPv4-compatible (deprecated): ::a.b.c.d
    "::7f00:1", "::127.0.0.1", "::a9fe:a9fe", "::10.0.0.1", "::c0a8:101",
    # NAT64, the well-known prefix: the last 32 bits
    "64:ff9b::7f00:1", "64:ff9b::127.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "64:ff9b::c0a8:101",
    # NAT64, the local-use prefix: refused whole, public IPv4 or not
    "64:ff9b:1::a9fe:a9fe", "64:ff9b:1:808:8:800::", "64:ff9b:1::808:808",
    # 6to4: bits 16-47
    "2002:a9fe:a9fe::1", "2002:7f00:1::1", "2002:a00:1::", "2002:c0a8:101:1::1",
    # Teredo: the server or the client (stored XOR ffffffff) is not public
    teredo("65.54.227.120", "127.0.0.1"), teredo("65.54.227.120", "169.254.169.254"),
    teredo("10.0.0.1", "8.8.8.8"), teredo("65.54.227.120", "192.0.2.45"),
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # RFC 4380's example: client 192.0.2.45 (documentation)
    # not addresses
    "", "localhost", "127.1", "1.2.3.4.5", "::ffff:1.2.3.4.5", "2002:zzzz::1",
]

PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001::200e",
    "::ffff:8.8.8.8", "::808:808", "64:ff9b::808:808", "64:ff9b::8.8.8.8", "2002:808:808::1",
    teredo("65.54.227.120", "8.8.8.8"), teredo("8.8.4.4", "1.1.1.1"),
]


@pytest.mark.parametrize("address", REFUSED)
def test_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public(address):
    assert is_public_address(address)


@pytest.mark.parametrize(("address", "carried"), [
    ("::7f00:1", ["127.0.0.1"]),
    ("::ffff:a9fe:a9fe", ["169.254.169.254"]),
    ("64:ff9b::a9fe:a9fe", ["169.254.169.254"]),
    ("2002:a9fe:a9fe::1", ["169.254.169.254"]),
    (teredo("65.54.227.120", "192.0.2.45"), ["65.54.227.120", "192.0.2.45"]),
    ("2606:4700:4700::1111", None),
])
def test_embedded_ipv4(address, carried):
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert (None if found is None else [str(a) for a in found]) == carried


def test_teredo_helper_matches_rfc_4380_example():
    assert teredo("65.54.227.120", "192.0.2.45") == "2001:0:4136:e378:8000:63bf:3fff:fdd2"  # port 40000


def test_the_webhook_guard_refuses_each_address_at_submit_and_delivery():
    """`check_addresses` runs at submit (`check_target`) and before every delivery attempt
    (`resolve_target`) on every address the host resolves to: one refused address among public
    ones refuses the target."""
    from patchdiff_core.service.settings import Settings
    from patchdiff_core.service.webhooks import WebhookRefused, check_addresses

    guarded, open_ = Settings(webhook_allow_private=False), Settings(webhook_allow_private=True)
    for address in REFUSED:
        with pytest.raises(WebhookRefused, match="private, loopback or reserved"):
            check_addresses("hooks.example", ["8.8.8.8", address], guarded)
        check_addresses("hooks.example", [address], open_)  # the guard off
    check_addresses("hooks.example", PUBLIC, guarded)  # all public: no error
