"""One local worker process: ``python -m autobatch.search.worker_process SPEC.json``.

:func:`autobatch.search.local_workers.run_local_workers` starts it, by module name. It is a
module of its own so that the imports point one way: ``tune`` starts local workers, and
this module, which runs ``tune``, is imported by nothing.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from autobatch.errors import AutobatchError
from autobatch.search.coordination import worker_label
from autobatch.search.local_workers import tune_kwargs
from autobatch.search.tune import tune


def main(spec_path: str) -> int:
    """Run ``tune()`` with the spec's keyword arguments; the exit code says how it ended (130: interrupted)."""
    spec = json.loads(Path(spec_path).read_text())
    for entry in reversed(spec.pop("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # preemption: stop like Ctrl-C

    try:
        tune(**tune_kwargs(spec))
    except KeyboardInterrupt:
        print(f"worker {worker_label()}: interrupted", file=sys.stderr)
        return 130
    except AutobatchError as error:
        print(f"worker {worker_label()}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
