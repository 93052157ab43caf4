"""What each stage of the GPU window measures (:mod:`harness.bench.window` runs one per process).

``python -m harness.bench.measures STAGE OUT OPTIONS_JSON PARENT_PID``. Each measurement becomes
a record the moment it exists (:class:`harness.bench.records.Recorder`); a method that fails is
recorded with its error's one line and the stage goes on; a stage past its own deadline
(``DMLBENCH_STAGE_DEADLINE``, set by the window a few seconds before the cap) records what it had
no time for as skipped. Sizes are the GPU's unless ``tiny`` (toy sizes for a CPU test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.bench.measuring import FULL, TINY
from harness.bench.model_stages import decode, mapr, smoke, step
from harness.bench.records import Recorder
from harness.bench.training_stages import concurrency, e2e, sop

BODIES = {
    "smoke": smoke,
    "step": step,
    "e2e": e2e,
    "sop": sop,
    "concurrency": concurrency,
    "decode": decode,
    "mapr": mapr,
}


def main(argv: list[str]) -> int:
    stage, out, options, parent = argv[0], Path(argv[1]), json.loads(argv[2]), int(argv[3])
    from harness.runtime.interrupts import die_with_parent

    die_with_parent(parent)  # a window killed outright (kill -9) takes its stage with it
    sizes = TINY if options.get("tiny") else FULL
    BODIES[stage](Recorder(out, stage), sizes, options)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
