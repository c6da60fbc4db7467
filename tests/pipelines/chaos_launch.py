"""`vlp-data` for the chaos test: VLP_KILL_AT=rename:N (the N-th file move of the pipeline's
writes) or replace:N (the N-th move of the publish swap) SIGKILLs the process right there, as a
preempted machine would. Prints how many of each it made, for choosing kill points."""
import atexit
import os
import signal
import sys

kind, _, at = os.environ.get("VLP_KILL_AT", ":0").partition(":")
moves = {"rename": 0, "replace": 0}


def _killing(name, real):
    def move(*args, **kwargs):
        moves[name] += 1
        if name == kind and moves[name] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return move


os.rename = _killing("rename", os.rename)  # Beam's local filesystem: each written file into place
os.replace = _killing("replace", os.replace)  # build.finish_publish: the swap
atexit.register(lambda: print(f"MOVES rename={moves['rename']} replace={moves['replace']}", file=sys.stderr))

from pipelines.cli import main  # noqa: E402

main(prog_name="vlp-data")
