"""`vlp-train` for the kill-and-resume soak: VLP_KILL_AT=step:N SIGKILLs the process as its N-th
optimizer step returns, save:N inside its N-th checkpoint write (written, not yet renamed into
place), log:N as it writes its N-th log row; as a preempted machine would, with no clean-up."""
import os
import signal

import torch

kind, _, at = os.environ.get("VLP_KILL_AT", ":0").partition(":")
calls = {"step": 0, "save": 0, "log": 0}
torch.set_num_threads(1)  # the same arithmetic in every process of the soak


def _killing(name, real):
    def call(*args, **kwargs):
        calls[name] += 1
        if name == kind and calls[name] == int(at):
            if name == "step":
                real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call


import vlp_train.checkpoint as checkpoint  # noqa: E402
import vlp_train.runlog as runlog  # noqa: E402
import vlp_train.train as train  # noqa: E402

train.optimizer_step = _killing("step", train.optimizer_step)
checkpoint.os.replace = _killing("save", checkpoint.os.replace)
runlog.RunLogger._write = _killing("log", runlog.RunLogger._write)

from vlp_train.cli import main  # noqa: E402

main(prog_name="vlp-train")
