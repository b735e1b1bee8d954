"""One POST by the webhook sender against a real receiver on 127.0.0.1: status
handling, redirects, timeouts, Retry-After, and the connection pinned to the
checked address (Host header and TLS name kept)."""
from __future__ import annotations

import datetime as dt
import ssl
import time

import pytest

from genq.webhook_guard import Policy
from tests.receiver import Answer, Receiver
from worker.webhook_sender import post

LOCAL = Policy(allow_http=True, allowed_hosts=frozenset({"127.0.0.1"}))
HEADERS = {"webhook-id": "msg_1", "webhook-timestamp": "0", "webhook-signature": "v1,x", "content-type": "application/json"}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def send(url, policy=LOCAL, timeout=5.0, **kw):
    return post(url, b'{"id":"j"}', HEADERS, policy=policy, timeout=timeout, **kw)


def test_2xx_is_success_and_the_request_is_what_was_signed(receiver):
    receiver.script("/ok", 204)
    out = send(receiver.url("/ok"))
    assert (out.ok, out.status_code, out.error) == (True, 204, None)
    [got] = receiver.to("/ok")
    assert got.body == b'{"id":"j"}'
    assert {k: got.headers[k] for k in HEADERS} == HEADERS
    assert got.headers["host"] == f"127.0.0.1:{receiver.port}"


def test_an_error_answer_is_logged_with_the_start_of_its_body(receiver):
    receiver.script("/boom", 500)
    out = send(receiver.url("/boom"))
    assert not out.ok and out.status_code == 500 and out.error == "HTTP 500: answer 500" and out.retry_after is None


def test_redirects_are_not_followed(receiver):
    receiver.script("/moved", Answer(302, {"Location": receiver.url("/target")}))
    receiver.script("/target", 200)
    out = send(receiver.url("/moved"))
    assert not out.ok and out.status_code == 302
    assert "not followed" in out.error and "/target" in out.error
    assert receiver.to("/target") == []


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_carry_retry_after(receiver, status):
    receiver.script("/busy", Answer(status, {"Retry-After": "7"}))
    assert send(receiver.url("/busy")).retry_after == 7
    receiver.script("/other", Answer(500, {"Retry-After": "7"}))
    assert send(receiver.url("/other")).retry_after is None  # only 429 and 503 ask for a wait


def test_a_slow_receiver_times_out(receiver):
    receiver.script("/slow", Answer(200, delay=2))
    started = time.monotonic()
    out = send(receiver.url("/slow"), timeout=0.5)
    assert not out.ok and out.status_code is None and out.error == "no answer within the 0.5 s timeout"
    assert 400 <= out.duration_ms < 1500 and time.monotonic() - started < 1.5


def test_a_closed_port_is_a_failure_not_a_crash(receiver):
    port = receiver.port
    receiver.close()
    out = send(f"http://127.0.0.1:{port}/gone")
    assert not out.ok and out.error.startswith("could not connect")


def test_a_name_that_now_resolves_inside_is_refused_when_sending(receiver):
    receiver.script("/h", 200)
    # Public at submit, loopback now (DNS rebinding): refused before any connection.
    rebound = lambda host, port: ["127.0.0.1"]  # noqa: E731
    out = send(f"http://hooks.test:{receiver.port}/h", policy=Policy(allow_http=True), resolver=rebound)
    assert not out.ok and out.status_code is None
    assert out.error == "refused: webhook host hooks.test resolves to 127.0.0.1, a loopback address; webhooks go to public addresses only"
    assert receiver.requests == []


def test_the_connection_goes_to_the_checked_address_with_the_name_kept(receiver):
    receiver.script("/h?x=1", 200)
    seen = []

    def resolve(host, port):
        seen.append(host)
        return ["127.0.0.1"]

    policy = Policy(allow_http=True, allowed_hosts=frozenset({"hooks.test"}))
    out = send(f"http://hooks.test:{receiver.port}/h?x=1", policy=policy, resolver=resolve)
    assert out.ok and seen == ["hooks.test"]
    assert receiver.requests[0].path == "/h?x=1"
    assert receiver.requests[0].headers["host"] == f"hooks.test:{receiver.port}"


def test_an_address_that_refuses_falls_through_to_the_next_checked_one(receiver):
    receiver.script("/h", 200)
    # Nothing listens on ::1 (refused, or no IPv6 at all); the receiver is on 127.0.0.1.
    policy = Policy(allow_http=True, allowed_hosts=frozenset({"hooks.test"}))
    out = send(f"http://hooks.test:{receiver.port}/h", policy=policy, resolver=lambda h, p: ["::1", "127.0.0.1"])
    assert out.ok, out.error
    assert len(receiver.requests) == 1


def self_signed(tmp_path, name: str):
    """A certificate for `name` (and its key), made here: no CA outside the test is involved."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("served_name, ok", [("hooks.test", True), ("other.test", False)])
def test_https_to_a_pinned_address_checks_the_certificate_against_the_name(tmp_path, served_name, ok):
    cert, key = self_signed(tmp_path, served_name)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = Receiver(tls=tls)
    try:
        receiver.script("/h", 200)
        policy = Policy(allowed_hosts=frozenset({"hooks.test"}))
        out = send(f"https://hooks.test:{receiver.port}/h", policy=policy, resolver=lambda h, p: ["127.0.0.1"],
                   ca_certs=cert)
        if ok:
            assert out.ok, out.error
            assert receiver.requests[0].headers["host"] == f"hooks.test:{receiver.port}"
        else:
            assert not out.ok and "connection failed: SSLError" in out.error, out.error
            assert "hooks.test" in out.error
            assert receiver.requests == []
    finally:
        receiver.close()
