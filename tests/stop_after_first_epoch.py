"""`torchrun ... tests/stop_after_first_epoch.py finetune ...`: msa's CLI, with the process
that saves the resume state killed (SIGKILL) right after saving epoch 1's. For
tests/test_distributed.py."""

import os
import signal

from msa.training import loop as training

save = training.save_resume_state


def save_then_die(path, state, *args, **kwargs):
    save(path, state, *args, **kwargs)
    if state.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)


training.save_resume_state = save_then_die

from msa.cli import app  # noqa: E402

app(prog_name="msa")
