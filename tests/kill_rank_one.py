"""`torchrun ... tests/kill_rank_one.py extract ...`: msa's CLI, with rank 1 killed (SIGKILL)
after its second feature batch is written (texts written every 4 rows, not 512, so that
a small share has a second write). For tests/test_distributed.py."""

import os
import signal

from msa.cache import writer
from msa.models.modalities import text

text.WRITE_WINDOW = 4
if os.environ.get("RANK") == "1":
    write = writer.FeatureWriter.write
    written = []

    def write_then_die(self, *args, **kwargs):
        write(self, *args, **kwargs)
        written.append(1)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    writer.FeatureWriter.write = write_then_die

from msa.cli import app  # noqa: E402

app(prog_name="msa")
