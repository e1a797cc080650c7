#!/usr/bin/env python
"""`python bench/rank_usage.py ARGS...` = `qtool ARGS...`, and at exit this process's peak RSS and CPU seconds go to
$QTOOL_BENCH_USAGE_DIR/rank<R>.json (R: torchrun's RANK, 0 without it). bench/gptq_torchrun.py runs each process of
a torchrun run through it, since /usr/bin/time sees only the largest of a launcher's children."""
import atexit
import json
import os
import resource
import sys


def _record():
    u = resource.getrusage(resource.RUSAGE_SELF)
    path = os.path.join(os.environ["QTOOL_BENCH_USAGE_DIR"], f"rank{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as f:
        json.dump({"rss_gib": u.ru_maxrss / 2**20, "cpu_s": u.ru_utime + u.ru_stime}, f)


atexit.register(_record)
from qtool.cli import main  # noqa: E402

main(sys.argv[1:], prog_name="qtool")
