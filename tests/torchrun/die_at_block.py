"""Run `qtool ARGS...` as one torchrun process; the process of rank $QTOOL_TEST_DIE_RANK kills itself (SIGKILL)
when the layer walk reaches block $QTOOL_TEST_DIE_BLOCK (-1: none dies); every process that ends writes its exit code to
$QTOOL_TEST_RC_DIR/rank<R>.rc. Used by tests/test_distributed.py (a killed rank mid-walk)."""
import os
import signal
import sys

from qtool.calib import walk
from qtool.cli import main

RANK = int(os.environ["RANK"])
blocks = walk.LayerWalk.blocks


def dying_blocks(self):
    for item in blocks(self):
        index = item[0] if isinstance(item, tuple) else item.index
        if RANK == int(os.environ["QTOOL_TEST_DIE_RANK"]) and index == int(os.environ["QTOOL_TEST_DIE_BLOCK"]):
            os.kill(os.getpid(), signal.SIGKILL)
        yield item


walk.LayerWalk.blocks = dying_blocks
code = 0
try:
    main(sys.argv[1:], prog_name="qtool")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
finally:
    with open(os.path.join(os.environ["QTOOL_TEST_RC_DIR"], f"rank{RANK}.rc"), "w") as f:
        f.write(str(code))
sys.exit(code)
