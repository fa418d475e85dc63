"""Run ``pacs-ai`` with every thread under its own cProfile (used by
``bench/ingest.py --profile cprofile``).

``python -m cProfile`` sees only the main thread, and the node does its work
in pynetdicom's association and DUL threads. Here ``threading.Thread.run`` is
wrapped so that each thread gets a ``cProfile.Profile`` timed with
``time.thread_time`` (CPU time of that thread, so waiting and sleeping cost
nothing); at exit all of them are merged into one pstats file.

Usage: python bench/_cprofile_threads.py OUT.pstats node --config FILE
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()
_orig_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    prof = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(prof)
    prof.enable()
    try:
        _orig_run(self)
    finally:
        prof.disable()


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from study_queue.cli import main as cli_main

    main_prof = cProfile.Profile(time.thread_time)
    main_prof.enable()
    try:
        rc = cli_main(argv)
    finally:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        with _lock:
            profiles = list(_profiles)
        for prof in profiles:
            prof.disable()  # a thread still running (daemon): take what it has
            try:
                stats.add(prof)
            except TypeError:  # a profile that never recorded anything
                pass
        stats.dump_stats(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
