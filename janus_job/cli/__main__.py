"""`python -m janus_job.cli ...` is the `janus-job` command."""

from janus_job.cli import main

main()
