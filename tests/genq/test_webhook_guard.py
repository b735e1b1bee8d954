"""The SSRF guard: which webhook URLs and addresses are refused, in every form
an address can be written in."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from genq.webhook_guard import (
    Policy,
    WebhookRefused,
    allowed_addresses,
    check_at_submit,
    literal_address,
    parse,
    refusal,
)

DEFAULT = Policy()


def resolver_of(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} does not resolve")
        return table[host]

    return resolve


NAMES = resolver_of({
    "hooks.example.com": ["93.184.216.34"],
    "internal.example.com": ["10.1.2.3"],
    # One good answer does not excuse a bad one: the connection could go to either.
    "mixed.example.com": ["93.184.216.34", "127.0.0.1"],
    "v6.example.com": ["2606:2800:220:1:248:1893:25c8:1946"],
    "mapped.example.com": ["::ffff:169.254.169.254"],
})


@pytest.mark.parametrize("url, reason", [
    ("https://127.0.0.1/", "loopback"),
    ("https://127.8.9.10/", "loopback"),
    ("https://2130706433/", "loopback"),  # 127.0.0.1 as one decimal number
    ("https://0x7f.1/", "loopback"),  # hex and a short form
    ("https://0x7f000001/", "loopback"),
    ("https://017700000001/", "loopback"),  # octal
    ("https://0177.0.0.1/", "loopback"),
    ("https://127.1/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback (inside an IPv6 address)"),
    ("https://[::ffff:7f00:1]/", "loopback (inside an IPv6 address)"),
    ("https://[64:ff9b::7f00:1]/", "loopback (inside an IPv6 address)"),  # NAT64
    ("https://[2002:7f00:1::]/", "loopback (inside an IPv6 address)"),  # 6to4
    ("https://10.0.0.1/", "private"),
    ("https://172.16.5.4/", "private"),
    ("https://192.168.1.1/", "private"),
    ("https://[fc00::1]/", "private"),
    ("https://[fd12:3456::1]/", "private"),
    ("https://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("https://[fe80::1]/", "link-local"),
    ("https://[::ffff:169.254.169.254]/", "link-local (inside an IPv6 address)"),
    ("https://100.64.0.1/", "CGNAT (shared)"),
    ("https://100.127.255.254/", "CGNAT (shared)"),
    ("https://224.0.0.1/", "multicast"),
    ("https://239.255.255.250/", "multicast"),
    ("https://[ff02::1]/", "multicast"),
    ("https://240.0.0.1/", "reserved"),
    ("https://255.255.255.255/", "reserved"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://[::]/", "unspecified"),
    ("https://0/", "unspecified"),
    ("https://192.0.2.10/", "private"),  # documentation range
    ("https://198.18.0.1/", "private"),  # benchmarking range
])
def test_internal_addresses_are_refused_in_every_spelling(url, reason):
    with pytest.raises(WebhookRefused) as caught:
        check_at_submit(url, DEFAULT, NAMES)
    assert f"a {reason} address" in caught.value.message, caught.value.message


@pytest.mark.parametrize("host, address", [
    ("2130706433", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("10.1", "10.0.0.1"),
    ("::ffff:127.0.0.1", "::ffff:7f00:1"),
    ("hooks.example.com", None),
    ("cafe.be", None),  # only hex letters, still a name
])
def test_numeric_hosts_stand_for_the_address_a_resolver_would_make(host, address):
    found = literal_address(host)
    assert (str(found) if found else None) == address


def test_names_are_checked_by_what_they_resolve_to():
    check_at_submit("https://hooks.example.com/hook", DEFAULT, NAMES)
    check_at_submit("https://v6.example.com/hook", DEFAULT, NAMES)
    for host, shown in [("internal.example.com", "10.1.2.3, a private"), ("mixed.example.com", "127.0.0.1, a loopback"),
                        ("mapped.example.com", "::ffff:169.254.169.254, a link-local")]:
        with pytest.raises(WebhookRefused, match=f"webhook host {host} resolves to {shown}"):
            check_at_submit(f"https://{host}/", DEFAULT, NAMES)


def test_localhost_is_refused_through_the_system_resolver():
    with pytest.raises(WebhookRefused, match="localhost resolves to 127.0.0.1, a loopback address"):
        check_at_submit("https://localhost/hook", DEFAULT)


def test_a_name_that_does_not_resolve_passes_at_submit_but_not_when_sending():
    check_at_submit("https://nowhere.example.com/hook", DEFAULT, NAMES)
    with pytest.raises(socket.gaierror):
        allowed_addresses(parse("https://nowhere.example.com/hook", DEFAULT), DEFAULT, NAMES)


def test_a_public_address_is_allowed_and_returned_for_connecting():
    assert allowed_addresses(parse("https://93.184.216.34:8443/x?y=1", DEFAULT), DEFAULT, NAMES) == ["93.184.216.34"]
    assert allowed_addresses(parse("https://hooks.example.com/", DEFAULT), DEFAULT, NAMES) == ["93.184.216.34"]


@pytest.mark.parametrize("url, words", [
    ("http://hooks.example.com/", "must use https"),
    ("ftp://hooks.example.com/", "must be an https:// URL"),
    ("https://user:pw@hooks.example.com/", "carries credentials"),
    ("https:///nohost", "no usable host"),
    ("https://[::1/", "not a valid URL"),
    ("https://999.1/", "not a valid address"),
])
def test_schemes_credentials_and_malformed_urls_are_refused(url, words):
    with pytest.raises(WebhookRefused, match=words):
        check_at_submit(url, DEFAULT, NAMES)


def test_operator_allowances():
    local = Policy(allow_http=True, allowed_hosts=frozenset({"127.0.0.1"}))
    # The host exactly as written is exempt...
    assert allowed_addresses(parse("http://127.0.0.1:8080/hook", local), local, NAMES) == ["127.0.0.1"]
    # ...not other spellings of the same address, nor names that resolve to it.
    for url in ("http://2130706433:8080/", "http://localhost:8080/", "http://[::ffff:127.0.0.1]:8080/"):
        with pytest.raises(WebhookRefused):
            check_at_submit(url, local)
    # An allowed host may use http without allow_http.
    named = Policy(allowed_hosts=frozenset({"receiver.internal"}))
    target = parse("http://receiver.internal/hook", named)
    assert allowed_addresses(target, named, resolver_of({"receiver.internal": ["10.9.8.7"]})) == ["10.9.8.7"]
    with pytest.raises(WebhookRefused, match="must use https"):
        parse("http://other.internal/", named)
    everything = Policy(allow_private=True)
    assert allowed_addresses(parse("https://10.0.0.1/", everything), everything, NAMES) == ["10.0.0.1"]


def test_target_keeps_path_query_and_host_header():
    t = parse("https://Hooks.Example.com:8443/a/b?c=1&d=2", DEFAULT)
    assert (t.scheme, t.host, t.port, t.path) == ("https", "hooks.example.com", 8443, "/a/b?c=1&d=2")
    assert t.host_header == "hooks.example.com:8443"
    assert parse("https://hooks.example.com", DEFAULT).path == "/"
    assert parse("https://[2606:2800::1]/", DEFAULT).host_header == "[2606:2800::1]"


def test_public_addresses_have_no_refusal():
    for raw in ("93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8"):
        assert refusal(ipaddress.ip_address(raw)) is None, raw
