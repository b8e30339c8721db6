"""Data-path throughput: the ImageFolder/JPEG loader against the decode speed of the same JPEGs
in a tight loop (same run), the decoded uint8 cache, and JPEG draft decoding of large files.

    python benchmarks/loader_throughput.py --quick             # 5,000 CIFAR-10 JPEGs, ~1-2 min
    python benchmarks/loader_throughput.py --out loader.json   # all 50,000, ~5 min
    python benchmarks/loader_throughput.py --smoke-test        # a generated tree, seconds

Data: the CIFAR-10 JPEG tarball (``--data``, default ``/work/shared/data/cifar10-jpeg.tar.gz``;
an ImageFolder tree works too), extracted into a temporary folder (``--cache`` to keep it)
that is removed afterwards; without the file a generated JPEG tree (said in the output).

Rows (``setting``), each timed best of ``reps`` after one untimed pass (files in the page cache):

- ``decode_loop_pil``: ``PIL.Image.open(path).convert("RGB")`` to a numpy array, file after
  file in one process (what the library did before).
- ``decode_loop``: ``torchvision.io.decode_image`` of the file's bytes, file after file: the
  fastest decode of these JPEGs in one process, the limit every other row is compared with
  (``ratio_to_decode``, per decoding process).
- ``read_image_loop``: the library's ``ImageFileDataset.load`` (read + decode + checks).
- ``loader_files_w0`` / ``loader_files_w2``: a training epoch through ``torch.utils.data
  .DataLoader`` (batch 256, ``EpochShardSampler``) reading the files, in the main process / in
  2 worker processes; ``images_per_s_per_worker`` divides by the processes that decode.
- ``cache_build``: decoding everything once into the uint8 cache (``nfpi.data.cache``).
- ``loader_cache_w0``: the same epoch from the memory-mapped cache (no decoding).
- ``large_decode_loop``, ``large_read_full``, ``large_read_draft``: ImageNet-sized JPEGs
  (400 x 336, made from the same images) read for ``image_size=64``: PIL's full decode in a
  loop, the library's read with draft mode off (full decode + resize), and with it (libjpeg's
  1/4 DCT scale, then resize); their ratio is to ``large_decode_loop``.

Records: ``setting``, ``images_per_s``, ``ratio_to_decode`` (images per second per decoding
process over the limit's), ``cpu_ratio_to_decode`` (images per CPU-second over the limit's: the
same question, robust to other jobs on the machine), ``images_per_s_per_worker``, ``workers``,
``images``, ``seconds``, ``cpu_s`` (CPU of this process and its finished children in the timed
pass), ``images_per_cpu_s``, ``data``, ``loadavg``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from _common import benchmark_parser, mode_name, write_records  # benchmarks/ is on sys.path
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image

from nfpi.data import DecodedCache, ImageFileDataset, load_dataset, write_imagefolder
from nfpi.data.sharding import EpochShardSampler

DEFAULT_DATA = "/work/shared/data/cifar10-jpeg.tar.gz"
BATCH = 256
LARGE_SIZE = (400, 336)  # (w, h): about an average ImageNet photo
LARGE_TARGET = 64


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _time(fn: Callable[[], int], reps: int) -> tuple[float, float, int]:
    """Best wall time of ``reps`` timed calls after one warm-up; (seconds, cpu_s, images)."""
    fn()
    best = (float("inf"), 0.0, 0)
    for _ in range(reps):
        c0, t0 = _cpu(), time.perf_counter()
        n = fn()
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        if wall < best[0]:
            best = (wall, cpu, n)
    return best


@contextlib.contextmanager
def _no_draft() -> Iterator[None]:
    """JPEGs decoded at full size whatever ``image_size`` asks (the pre-draft reader)."""
    original = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = original  # type: ignore[method-assign]


def _decode_loop_pil(paths: list[Path]) -> Callable[[], int]:
    def run() -> int:
        for path in paths:
            with Image.open(path) as img:
                np.asarray(img.convert("RGB"))
        return len(paths)

    return run


def _decode_loop(paths: list[Path]) -> Callable[[], int]:
    def run() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's decoders
            for path in paths:
                with open(path, "rb") as f:
                    data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
                decode_image(data, mode=ImageReadMode.RGB)
        return len(paths)

    return run


def _epoch(dataset, workers: int) -> Callable[[], int]:
    sampler = EpochShardSampler(len(dataset), seed=0)

    def run() -> int:
        loader = DataLoader(dataset, BATCH, sampler=sampler, num_workers=workers)
        return sum(len(y) for _, y in loader)

    return run


def _write_large(paths: list[Path], folder: Path) -> list[Path]:
    """ImageNet-sized JPEGs: each image upscaled to LARGE_SIZE (bicubic), quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            big = img.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
        target = folder / f"{i:05d}.jpg"
        big.save(target, quality=90)
        out.append(target)
    return out


def _row(setting: str, timing: tuple[float, float, int], workers: int, decode: dict | None):
    """A record; ratios to ``decode`` (the limit's row; None: this row is the limit)."""
    seconds, cpu, n = timing
    per_s = n / seconds
    per_worker = per_s / max(workers, 1)
    per_cpu_s = n / cpu if cpu > 0 else float("nan")
    return {
        "setting": setting,
        "images_per_s": per_s,
        "ratio_to_decode": per_worker / decode["images_per_s"] if decode else 1.0,
        "cpu_ratio_to_decode": per_cpu_s / decode["images_per_cpu_s"] if decode else 1.0,
        "images_per_s_per_worker": per_worker,
        "workers": workers,
        "images": n,
        "seconds": seconds,
        "cpu_s": cpu,
        "images_per_cpu_s": per_cpu_s,
        "loadavg": os.getloadavg()[0],
    }


def measure(root: Path | str, tmp: Path, *, per_class: int | None, large: int, reps: int):
    """Every row on the train split of ``root`` (tree or archive, extracted under ``tmp``)."""
    dataset, info = load_dataset(
        "imagefolder", "train", root=root, extract_to=tmp / "extracted", items_per_class=per_class
    )
    paths = dataset.paths
    limit = _row("decode_loop", _time(_decode_loop(paths), reps), 0, None)
    rows = [_row("decode_loop_pil", _time(_decode_loop_pil(paths), reps), 0, limit), limit]

    def read_loop() -> int:
        for i in range(len(dataset)):
            dataset.load(i)
        return len(dataset)

    rows.append(_row("read_image_loop", _time(read_loop, reps), 0, limit))
    rows.append(_row("loader_files_w0", _time(_epoch(dataset, 0), reps), 0, limit))
    rows.append(_row("loader_files_w2", _time(_epoch(dataset, 2), reps), 2, limit))

    builds = iter(range(reps + 1))

    def build() -> int:
        cache = DecodedCache(tmp / f"cache-{next(builds)}", dataset)
        cache.prepare()
        cache.fill()
        cache.finish()
        return len(dataset)

    rows.append(_row("cache_build", _time(build, reps), 0, limit))
    cached = DecodedCache(tmp / "cache-0", dataset).open()
    rows.append(_row("loader_cache_w0", _time(_epoch(cached, 0), reps), 0, limit))

    big = _write_large(paths[:large], tmp / "large")
    shape = (3, LARGE_TARGET, LARGE_TARGET)
    big_set = ImageFileDataset(big, torch.zeros(len(big), dtype=torch.int64), shape, LARGE_TARGET)
    large = _row("large_decode_loop", _time(_decode_loop_pil(big), reps), 0, None)
    rows.append(large)

    def read_big() -> int:
        for i in range(len(big_set)):
            big_set.load(i)
        return len(big_set)

    with _no_draft():
        rows.append(_row("large_read_full", _time(read_big, reps), 0, large))
    rows.append(_row("large_read_draft", _time(read_big, reps), 0, large))
    return rows, info


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], "5,000 training JPEGs (500 per class), 3 repetitions"
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help="JPEG ImageFolder tree or archive")
    parser.add_argument("--cache", help="extract the archive here and keep it (default: a tmp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    smoke = args.smoke_test
    per_class = 20 if smoke else 500 if args.quick else None
    reps = 1 if smoke else 3 if args.quick else 2
    large = 16 if smoke else 200
    with tempfile.TemporaryDirectory(prefix="nfpi-loader-") as tmp:
        tmp = Path(tmp)
        data = Path(args.data)
        if smoke or not data.exists():
            note = "generated JPEG tree (10 classes)" + ("" if smoke else f"; {data} not found")
            data = write_imagefolder(tmp / "generated", num_classes=10, train_per_class=20)
        else:
            note = str(data)
        if args.cache:
            (tmp / "extracted").symlink_to(Path(args.cache).expanduser().resolve())
        rows, info = measure(data, tmp, per_class=per_class, large=large, reps=reps)
        if args.cache:
            (tmp / "extracted").unlink()
    for r in rows:
        r["data"] = note
    print(
        f"\nLoader throughput ({mode_name(args)}): {info.name}, {rows[0]['images']} training "
        f"images {info.shape}; {note}; torch 1 thread; best of {reps}"
    )
    print(
        f"{'setting':<18}{'images/s':>11}{'per worker':>12}{'ratio':>8}{'img/cpu_s':>11}"
        f"{'cpu_ratio':>10}{'images':>8}{'load':>6}"
    )
    for r in rows:
        print(
            f"{r['setting']:<18}{r['images_per_s']:>11.0f}{r['images_per_s_per_worker']:>12.0f}"
            f"{r['ratio_to_decode']:>8.2f}{r['images_per_cpu_s']:>11.0f}"
            f"{r['cpu_ratio_to_decode']:>10.2f}{r['images']:>8}"
            f"{r['loadavg']:>6.1f}"
        )
    by = {r["setting"]: r for r in rows}
    print("\nratio to the decode loop (wall per process / CPU):")
    for key, what in (
        ("decode_loop_pil", "PIL's decode loop"),
        ("loader_files_w0", "file loader, main process"),
        ("loader_files_w2", "file loader, per worker of 2"),
        ("loader_cache_w0", "decoded cache, main process"),
    ):
        print(
            f"  {what:<30}{by[key]['ratio_to_decode']:>7.2f} /{by[key]['cpu_ratio_to_decode']:>6.2f}"
        )
    draft = by["large_read_draft"]["images_per_cpu_s"] / by["large_read_full"]["images_per_cpu_s"]
    print(f"  draft vs full read of ImageNet-sized JPEGs at 64: {draft:.2f}x per CPU-second")
    if args.out:
        write_records(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
