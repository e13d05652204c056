"""`python -m fmprobe` runs the command line."""

from fmprobe.cli import app

app()
