"""Which webhook URLs genq may post to: https only, and never to an address
inside the operator's network (the SSRF guard).

A URL is checked when a job is submitted (the API answers 422) and again when
each delivery is sent, against the addresses the name resolves to then: the
sender connects to one of exactly those addresses, so a name that changed its
answer in between (DNS rebinding) is caught where it matters. Host names are
not trusted to mean what they look like: numeric forms such as `2130706433`,
`0x7f.1` or `127.1`, and IPv4 addresses inside IPv6 ones (`::ffff:127.0.0.1`,
NAT64, 6to4) are all reduced to the address they stand for.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from genq.errors import GenqError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses a connection could go to, as strings.
Resolver = Callable[[str, int], list[str]]

CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Letters, digits, dots, hyphens (and underscores some internal names use); an
# IPv6 literal arrives without its brackets and may carry a %zone.
HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$|^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
# The BSD forms inet_aton still accepts: 2130706433, 0x7f.1, 0177.0.0.1, 127.1.
NUMERIC_V4_RE = re.compile(r"^(0[xX][0-9A-Fa-f]*|[0-9]+)(\.(0[xX][0-9A-Fa-f]*|[0-9]+)){0,3}$")


class WebhookRefused(GenqError):
    """A webhook URL or the address it resolves to is not allowed."""

    code = "webhook_refused"


@dataclass(frozen=True)
class Policy:
    allow_http: bool = False
    # Skip the address check for every host.
    allow_private: bool = False
    # Hosts, exactly as written in a URL (lower case), that skip the address
    # check and may use http: an operator's own receivers.
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings) -> "Policy":
        return cls(
            allow_http=settings.webhook_allow_http,
            allow_private=settings.webhook_allow_private,
            allowed_hosts=frozenset(h.lower() for h in settings.webhook_allowed_hosts),
        )

    def exempt(self, host: str) -> bool:
        return self.allow_private or host in self.allowed_hosts


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart for connecting to a pinned address."""

    scheme: str
    host: str
    port: int
    # Path and query, as sent in the request line.
    path: str
    # The address the host stands for when it is written as one, else None.
    literal: IPAddress | None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse(url: str, policy: Policy) -> Target:
    """Take a webhook URL apart, refusing schemes, credentials and hosts the policy does not allow."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"webhook {url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("https", "http"):
        raise WebhookRefused(f"webhook {url!r} must be an https:// URL")
    if not host or not HOST_RE.match(host):
        raise WebhookRefused(f"webhook {url!r} has no usable host")
    if scheme == "http" and not (policy.allow_http or host in policy.allowed_hosts):
        raise WebhookRefused(f"webhook {url!r} must use https, not http")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(f"webhook {url!r} carries credentials; deliveries are signed, so leave them out")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path, literal_address(host))


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an address stands for, in any form a
    resolver would accept; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if NUMERIC_V4_RE.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            # Out of range (e.g. 999.1): no resolver will make an address of it either.
            raise WebhookRefused(f"webhook host {host!r} is not a valid address") from None
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why an address may not receive webhooks, in a word or two; None if it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = refusal(embedded)
            return f"{reason} (inside an IPv6 address)" if reason else None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT:
        return "CGNAT (shared)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def allowed_addresses(target: Target, policy: Policy, resolver: Resolver = system_resolver) -> list[str]:
    """The addresses the target's host resolves to, every one of them allowed,
    in the resolver's order. Raises WebhookRefused naming the first that is
    not (one bad answer refuses the host: the connection could go to any), and
    socket.gaierror when the name does not resolve."""
    if target.literal is not None:
        addresses = [str(target.literal)]
    else:
        addresses = resolver(target.host, target.port)
    if policy.exempt(target.host):
        return addresses
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
        if reason := refusal(ip):
            shown = target.host if target.literal is None or target.host == raw else f"{target.host} ({raw})"
            raise WebhookRefused(
                f"webhook host {shown} " + (f"resolves to {raw}, " if target.literal is None else "is ")
                + f"a {reason} address; webhooks go to public addresses only"
            )
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{target.host} has no address")
    return addresses


def check_at_submit(url: str, policy: Policy, resolver: Resolver = system_resolver) -> None:
    """Refuse a webhook URL when a job is submitted. A name that does not
    resolve now is let through: DNS hiccups are common and the send-time check
    (which records its failure in the delivery log) is the one that counts."""
    target = parse(url, policy)
    try:
        allowed_addresses(target, policy, resolver)
    except (socket.gaierror, UnicodeError):
        pass
