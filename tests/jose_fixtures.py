"""JOSE key files and panva jose as a peer (filled by the JOSE work)."""
