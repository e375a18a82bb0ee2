"""Subcommands of janus-job, one module per area."""
