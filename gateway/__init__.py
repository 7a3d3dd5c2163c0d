"""Encryption gateway for Google's Cards QR API: PGP or JWS-in-JWE at the application layer."""

__version__ = "0.1.0"
