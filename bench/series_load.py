#!/usr/bin/env python3
"""Series loading benchmark: dicom_node.ct_writer and dicom_node.series on a 300-slice 512x512 CT.

For each transfer syntax (Explicit VR Little Endian and one compressed one,
JPEG Lossless SV1 by default) it writes a synthetic chest-like CT series with
``write_ct_series``, then times, interleaved over ``--repeat`` rounds:

* ``load``:      ``scan_series`` + ``select_series`` + ``load_series`` (HU int16 volume), and
* ``reference``: plain ``pydicom.dcmread`` + ``.pixel_array`` of every file into a
  list, then ``np.stack`` (no sorting, no checks, no rescale),

and prints medians and the ratio load/reference. Both read files the write just
left in the page cache, so this measures CPU, not the disk. It checks that the
loaded volume equals the reference rescaled to HU, and reports the peak of
memory allocated (tracemalloc, which counts numpy buffers) by each in a separate,
untimed run. Files go to ``bench/out/series_load/`` (gitignored) and are removed
unless ``--keep``.

JPEG Lossless SV1, the syntax CT scanners send, has no encoder in pydicom, so
``write_ct_series`` writes Explicit VR Little Endian and DCMTK's ``dcmcjpeg
--encode-lossless-sv1`` (Debian package ``dcmtk``) compresses each file, one
process per file on a pool of ``--jobs`` threads; its ``write s`` includes that.
``j2k`` and ``rle`` are encoded by pydicom's own encoders.

Usage: ``.venv/bin/python bench/series_load.py [--slices 300] [--size 512]
[--repeat 3] [--syntax jpeg|j2k|rle] [--jobs N] [--keep]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.ct_writer import write_ct_series
from dicom_node.series import SeriesSelector, load_series, scan_series, select_series

SYNTAXES = {"jpeg": JPEGLosslessSV1, "j2k": JPEG2000Lossless, "rle": RLELossless}


def phantom(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """Air, an elliptical body of soft tissue, two lungs, a spine and noise: compresses like CT."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    body = (x / 0.42) ** 2 + (y / 0.3) ** 2 < 1
    lungs = ((np.abs(x) - 0.18) / 0.13) ** 2 + (y / 0.2) ** 2 < 1
    spine = x**2 + (y - 0.2) ** 2 < 0.04**2
    base = np.where(body, 40, -1000)
    base = np.where(lungs & body, -850, base)
    base = np.where(spine, 700, base).astype(np.int16)
    hu = np.empty((slices, size, size), dtype=np.int16)
    for k in range(slices):
        hu[k] = np.clip(base + rng.normal(0, 12, (size, size)), -1024, 3071)
    return hu


def write_series(folder: Path, hu: np.ndarray, syntax: str, jobs: int) -> list[Path]:
    geometry = (hu, (1.0, 0.7, 0.7), (-180.0, -180.0, -300.0))
    if syntax != JPEGLosslessSV1:
        return write_ct_series(folder, *geometry, transfer_syntax=syntax)
    dcmcjpeg = shutil.which("dcmcjpeg")
    if dcmcjpeg is None:
        raise SystemExit("JPEG Lossless SV1 needs DCMTK's dcmcjpeg (Debian package dcmtk); or use --syntax j2k")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plain-", dir=folder.parent) as plain_dir:
        plain = write_ct_series(plain_dir, *geometry)
        out = [folder / p.name for p in plain]

        def compress(pair: tuple[Path, Path]) -> None:
            src, dst = pair
            subprocess.run([dcmcjpeg, "--encode-lossless-sv1", "--uid-never", str(src), str(dst)],
                           check=True, capture_output=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(compress, zip(plain, out)))
    return out


def reference(folder: Path) -> np.ndarray:
    arrays = [pydicom.dcmread(p).pixel_array for p in sorted(folder.glob("*.dcm"))]
    return np.stack(arrays)


def ours(folder: Path):
    chosen, reasons = select_series(scan_series(folder), SeriesSelector(min_slices=2))
    if chosen is None:
        raise SystemExit(f"no series selected: {reasons}")
    return load_series(chosen)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def peak_mb(fn, *args) -> float:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--syntax", choices=sorted(SYNTAXES), default="jpeg")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel dcmcjpeg processes for --syntax jpeg (default: the CPU count)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "series_load")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    hu = phantom(args.slices, args.size)
    volume_mb = hu.nbytes / 1e6
    print(f"series_load: {args.slices}x{args.size}x{args.size} int16 ({volume_mb:.0f} MB), "
          f"medians of {args.repeat}, reference = dcmread + pixel_array per file + np.stack")
    print(f"{'transfer syntax':<28}{'write s':>9}{'MB on disk':>11}{'load s':>8}{'ref s':>8}"
          f"{'load/ref':>9}{'load peak MB':>13}{'ref peak MB':>12}")
    ok = True
    for label, syntax in (("explicit VR little endian", ExplicitVRLittleEndian), (args.syntax, SYNTAXES[args.syntax])):
        folder = args.out / str(syntax)
        shutil.rmtree(folder, ignore_errors=True)
        write_s, paths = timed(write_series, folder, hu, syntax, args.jobs)
        disk_mb = sum(p.stat().st_size for p in paths) / 1e6
        loads, refs = [], []
        for _ in range(args.repeat):
            t, loaded = timed(ours, folder)
            loads.append(t)
            del loaded
            t, ref = timed(reference, folder)
            refs.append(t)
            del ref
        loaded = ours(folder)
        ref = reference(folder).astype(np.int32) - 1024
        if not np.array_equal(loaded.hu, ref) or not np.array_equal(loaded.hu, hu):
            print(f"  {label}: loaded volume differs from the reference", file=sys.stderr)
            ok = False
        del loaded, ref
        load_peak = peak_mb(ours, folder)
        ref_peak = peak_mb(reference, folder)
        load_s, ref_s = statistics.median(loads), statistics.median(refs)
        print(f"{label:<28}{write_s:>9.2f}{disk_mb:>11.0f}{load_s:>8.2f}{ref_s:>8.2f}"
              f"{load_s / ref_s:>9.2f}{load_peak:>13.0f}{ref_peak:>12.0f}")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
