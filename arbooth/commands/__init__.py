"""CLI command modules (see arbooth/cli.py)."""
