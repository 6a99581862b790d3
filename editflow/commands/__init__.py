"""CLI subcommands; each module exposes ``command``."""
