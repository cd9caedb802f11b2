"""Subcommands of the ``lightning-spectral`` command (see :mod:`lightning_spectral.cli`)."""
