"""A system's TLS settings: a CA bundle to trust instead of the machine's store, and a client
certificate with its key (the key is a secret: vault.py). Checked when saved (the PEM parses,
the key belongs to the certificate); turned into one ssl.SSLContext per setting and process
when sent. Verification is never turned off."""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pipeline_console.errors import FieldError


def check_tls(ca_bundle: str | None, client_cert: str | None,
              client_key: str | None) -> list[FieldError]:
    errors = []
    if ca_bundle is not None:
        try:
            x509.load_pem_x509_certificates(ca_bundle.encode())
        except ValueError as error:
            errors.append(FieldError("tls.ca_bundle", f"is not PEM certificates: {error}"))
    cert = None
    if client_cert is not None:
        try:
            cert = x509.load_pem_x509_certificate(client_cert.encode())
        except ValueError as error:
            errors.append(FieldError("tls.client_cert", f"is not a PEM certificate: {error}"))
        if client_key is None:
            errors.append(FieldError("tls.client_key", "a client certificate needs its key",
                                     type="missing"))
    elif client_key is not None:
        errors.append(FieldError("tls.client_cert", "a client key needs its certificate",
                                 type="missing"))
    if client_key is not None:
        try:
            key = serialization.load_pem_private_key(client_key.encode(), password=None)
        except (ValueError, TypeError):
            # never the key or the library's message about it (it may quote it)
            errors.append(FieldError("tls.client_key", "is not an unencrypted PEM private "
                                                       "key"))
        else:
            if cert is not None and cert.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo) != key.public_key(
                    ).public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo):
                errors.append(FieldError("tls.client_key", "does not belong to client_cert"))
    return errors


@functools.lru_cache(maxsize=64)
def ssl_context(ca_bundle: str | None, client_cert: str | None,
                client_key: str | None) -> ssl.SSLContext:
    """Verifying, with the CA bundle (if any) in place of the default store, and the client
    certificate (if any). The key passes through a file only readable by this process, in
    memory where the machine has /dev/shm, removed at once (ssl loads a chain from files
    only)."""
    context = ssl.create_default_context(cadata=ca_bundle) if ca_bundle else \
        ssl.create_default_context()
    if client_cert and client_key:
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        handle, path = tempfile.mkstemp(prefix="pc-tls-", dir=directory)
        try:
            with os.fdopen(handle, "w") as file:
                file.write(client_cert.rstrip("\n") + "\n" + client_key)
            context.load_cert_chain(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return context


# Why a handshake failed, as OpenSSL names it: a certificate was not trusted, or the server
# refused ours (or its absence). An old server refusing a missing client certificate says
# only "handshake failure".
_REFUSED = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
            "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
            "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
            "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_ACCESS_DENIED",
            "SSLV3_ALERT_HANDSHAKE_FAILURE")


def certificate_problem(error: BaseException) -> str | None:
    """What went wrong with a certificate, for the attempt's error, when `error` (or what
    caused it) is a TLS certificate failure; None for anything else. Certificate failures
    are permanent: the next try meets the same certificates."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # (aiohttp's certificate error is an SSLCertVerificationError too, without its
        # fields: the original is in certificate_error)
        reason = getattr(error, "reason", None)
        if isinstance(error, ssl.SSLCertVerificationError) and reason:
            return ("TLS: the server's certificate could not be verified "
                    f"({getattr(error, 'verify_message', None) or reason}); does "
                    "tls.ca_bundle hold the CA that signed it?")
        if isinstance(error, ssl.SSLError) and reason in _REFUSED:
            return (f"TLS: the server refused the handshake ({reason.lower()}): it wants a "
                    "client certificate it trusts (tls.client_cert)")
        error = (getattr(error, "certificate_error", None) or error.__cause__
                 or error.__context__ or getattr(error, "os_error", None))
    return None
