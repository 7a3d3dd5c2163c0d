"""PGP key files and the gpg command line as a peer (filled by the PGP work)."""
