"""``edgecl train`` (the real command line) with rank CRASH_RANK failing in session 2, either by an
exception or by SIGKILL: run under torchrun by tests/test_distributed.py.
``python crash_train.py raise|kill CRASH_RANK -- <edgecl train arguments>``."""

import os
import signal
import sys

from edgecl.cli import main
from edgecl.learners.ranpac import RanPAC

how, crash_rank = sys.argv[1], int(sys.argv[2])
learn = RanPAC.learn


def failing_learn(self, t, train, new_classes):
    if t == 1 and self.dist.rank == crash_rank:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"rank {self.dist.rank}: failing on purpose in session 2")
    return learn(self, t, train, new_classes)


RanPAC.learn = failing_learn
main(sys.argv[sys.argv.index("--") + 1:])
