"""TLS contexts for DICOM TLS (PS3.15 Annex B, BCP 195): TLS 1.2 or newer, certificates verified.

The receive stage is the server (its certificate, optionally clients' certificates checked
against a CA); the dispatch stage is a client (the destination's certificate checked against a
CA, optionally with a client certificate of its own).
"""

from __future__ import annotations

import ssl

from dicomnode.config import DestinationTlsConfig, NodeTlsConfig


def server_context(cfg: NodeTlsConfig) -> ssl.SSLContext:
    """The receive stage's context: our certificate; client certificates required when configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    if cfg.ca is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: DestinationTlsConfig) -> ssl.SSLContext:
    """A dispatch context: the destination's certificate must chain to ``cfg.ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(cfg.ca))
    ctx.check_hostname = cfg.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cfg.cert is not None and cfg.key is not None:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    return ctx
