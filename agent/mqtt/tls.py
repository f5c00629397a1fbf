"""TLS to the broker: settings checks, the SSL context, and a clear error for a failed handshake.

Verification is on unless ``--mqtt_tls_insecure`` is given by name: the broker's
certificate must chain to ``--mqtt_ca_certs`` (the system's CAs when unset) and
name the host we connect to. Certificate and key files are read while the
settings are checked, so a missing or unreadable one stops the agent before the
model is loaded, with the flag and file named.

paho's network thread swallows the exception of a failed handshake and retries
for ever; the context here hands it to ``on_handshake_error`` first, so that the
agent can fail at start-up with the reason (a broker certificate that does not
verify is a configuration error, not an outage).

The reverse case, a plain connection to a TLS listener, shows nothing but a
connection closed before the CONNACK (paho: "Unspecified error"), which a broker
that is shutting down or full also does. ``answers_tls`` asks the port itself,
once, at start-up: a TLS handshake that gets an answer means the agent lacks
``--mqtt_tls``, and the start fails with that hint instead of retrying for ever.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.service.config import AgentConfig

log = logging.getLogger(__name__)

HandshakeError = Callable[[OSError], None]
# OpenSSL reasons of a failed handshake that no retry cures, with the likely fix.
_CONFIG_REASONS = {
    "WRONG_VERSION_NUMBER": "is --mqtt_port a TLS listener of the broker?",
    "TLSV1_ALERT_UNKNOWN_CA": "the broker does not trust --mqtt_certfile's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker refused the client certificate (--mqtt_certfile)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the broker requires a client certificate "
                                         "(--mqtt_certfile, --mqtt_keyfile)",
}
# A broker that closed our plain connection before its CONNACK and answers TLS on that port.
PLAIN_TO_TLS = ("the broker closed the plain MQTT connection before answering, and the port "
                "answers TLS: is the port a TLS listener? use --mqtt_tls (and --mqtt_ca_certs "
                "for a private CA)")
_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")
_FILES = (("mqtt_ca_certs", "CA certificate"), ("mqtt_certfile", "client certificate"),
          ("mqtt_keyfile", "private key"))


def tls_settings_problem(config: AgentConfig) -> str | None:
    """Why the TLS flags do not go together, or None. Files are not read here."""
    if not config.mqtt_tls:
        given = [f"--{name}" for name, _ in _FILES if getattr(config, name) is not None]
        if config.mqtt_tls_insecure:
            given.append("--mqtt_tls_insecure")
        if given:
            return f"{', '.join(given)} only apply with --mqtt_tls; add --mqtt_tls"
        return None
    if config.mqtt_keyfile is not None and config.mqtt_certfile is None:
        return "--mqtt_keyfile needs --mqtt_certfile (the client certificate it belongs to)"
    return None


def check_tls(config: AgentConfig) -> None:
    """ValueError if the TLS flags do not go together or a file of theirs is unusable."""
    problem = tls_settings_problem(config)
    if problem:
        raise ValueError(problem)
    if config.mqtt_tls:
        tls_context(config)


def _check_readable(flag: str, what: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"--{flag} {path}: the {what} file cannot be read "
                         f"({exc.strerror or exc})") from None


def tls_context(config: AgentConfig, on_handshake_error: HandshakeError | None = None
                ) -> ssl.SSLContext:
    """The client's SSL context for ``config`` (``mqtt_tls`` on); ValueError naming the flag and
    file for a file that is missing, unreadable or not PEM of the right kind."""
    problem = tls_settings_problem(config)
    if problem:
        raise ValueError(problem)
    for name, what in _FILES:
        path = getattr(config, name)
        if path is not None:
            _check_readable(name, what, path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and host name check
    try:
        if config.mqtt_ca_certs is not None:
            context.load_verify_locations(cafile=config.mqtt_ca_certs)
        else:
            context.load_default_certs()
    except ssl.SSLError as exc:
        raise ValueError(f"--mqtt_ca_certs {config.mqtt_ca_certs}: not a PEM CA certificate "
                         f"({exc.reason or exc})") from None
    if config.mqtt_certfile is not None:
        try:
            context.load_cert_chain(config.mqtt_certfile, config.mqtt_keyfile, password=_no_password)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                f"--mqtt_certfile {config.mqtt_certfile} / --mqtt_keyfile {config.mqtt_keyfile}: "
                f"not a PEM certificate and its (unencrypted) private key "
                f"({getattr(exc, 'reason', None) or exc})") from None
    if config.mqtt_tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if on_handshake_error is not None:
        context.sslsocket_class = _reporting_socket(on_handshake_error)
    return context


def _no_password() -> str:
    """An encrypted key would make ssl prompt on the terminal of a service: fail instead."""
    raise ValueError("the private key is encrypted; give an unencrypted key file")


def _reporting_socket(report: HandshakeError) -> type[ssl.SSLSocket]:
    class ReportingSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except (ssl.SSLError, ConnectionResetError) as exc:
                report(exc)
                raise

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                return super().recv(buflen, flags)
            except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows here
                if getattr(exc, "reason", None) in _CONFIG_REASONS:
                    report(exc)
                raise

    return ReportingSSLSocket


def configure_tls(client: object, config: AgentConfig, on_handshake_error: HandshakeError) -> None:
    """Sets up TLS on a paho client when ``config.mqtt_tls``; warns once for insecure mode."""
    if not config.mqtt_tls:
        return
    client.tls_set_context(tls_context(config, on_handshake_error))  # type: ignore[attr-defined]
    if config.mqtt_tls_insecure:
        client.tls_insecure_set(True)  # type: ignore[attr-defined]
        log.warning("--mqtt_tls_insecure: the broker's certificate and host name are NOT "
                    "verified; anyone on the network can impersonate the broker")


def handshake_message(exc: OSError) -> tuple[str, bool]:
    """What to say about a failed handshake, and whether it is fatal at start-up (retrying
    cannot help: a certificate that does not verify, a broker port without TLS)."""
    if not isinstance(exc, ssl.SSLError):  # reset: a plain MQTT listener hangs up on TLS
        return ("TLS handshake failed: the broker closed the connection; is --mqtt_port a TLS "
                "listener of the broker?", True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return (f"TLS handshake failed: the broker's certificate does not verify ({detail}); "
                "check --mqtt_ca_certs and that --mqtt_broker is a name in the certificate",
                True)
    reason = getattr(exc, "reason", None) or str(exc)
    if reason in _CONFIG_REASONS:
        return f"TLS handshake failed ({reason}): {_CONFIG_REASONS[reason]}", True
    return f"TLS handshake failed ({reason})", False


def answers_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a TLS handshake: a TLS listener, which hangs up on a plain
    MQTT CONNECT without a word. Only the kind of listener is asked, so nothing is verified;
    a TLS alert (e.g. "certificate required") is an answer too. A plain MQTT listener hangs
    up on the ClientHello: False, as for no answer within ``timeout`` s."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        return str(getattr(exc, "reason", None) or "").startswith(_ALERT_PREFIXES)
    except OSError:  # reset, closed, refused, timed out
        return False
