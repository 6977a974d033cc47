"""`python -m msa` (and `torchrun ... -m msa extract ...`) runs the CLI."""

from msa.cli import app

app(prog_name="msa")
