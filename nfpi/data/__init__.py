"""Data: datasets yielding uint8 images, the paper's augmentation, dequantisation, loaders.

Every dataset yields ``(x, y)``: ``x`` a uint8 tensor ``[C, H, W]``, ``y`` an int in
``[0, K)``. Models see ``dequantize(x)`` in ``[-1, 1)``; generated samples go back to pixels
with ``to_uint8``. Typical use::

    from nfpi.data import dequantize, load_dataset, make_loader, set_loader_epoch

    train, info = load_dataset("digits", "train", augment=True)
    loader = make_loader(train, 128, shuffle=True, seed=0)
    for epoch in range(epochs):
        set_loader_epoch(loader, seed=0, epoch=epoch)
        for x, y in loader:
            z, logdet = flow(dequantize(x))
"""

from nfpi.data.archive import UnsafeArchiveError, extract_archive
from nfpi.data.augment import BatchAugment, paper_augmentation
from nfpi.data.cache import DecodedCache, cache_root, decoded_dataset
from nfpi.data.datasets import (
    DatasetInfo,
    ImageDataset,
    ImageFileDataset,
    TensorImageDataset,
    read_image,
    subsample_per_class,
)
from nfpi.data.imagefolder import find_tree, load_imagefolder
from nfpi.data.load import (
    DATASET_NAMES,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    SPLITS,
    DatasetName,
    Split,
    default_data_root,
    digits_split_indices,
    load_dataset,
)
from nfpi.data.loader import epoch_seed, make_loader, set_loader_epoch
from nfpi.data.quantization import (
    LEVELS_8BIT,
    bits_per_dim,
    dequantization_offset,
    dequantize,
    display_uint8,
    to_uint8,
)
from nfpi.data.synthetic import class_pattern, make_synthetic, write_imagefolder

__all__ = [
    "DATASET_NAMES",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "LEVELS_8BIT",
    "SPLITS",
    "BatchAugment",
    "DatasetInfo",
    "DatasetName",
    "DecodedCache",
    "ImageDataset",
    "ImageFileDataset",
    "Split",
    "TensorImageDataset",
    "UnsafeArchiveError",
    "bits_per_dim",
    "cache_root",
    "class_pattern",
    "decoded_dataset",
    "default_data_root",
    "dequantization_offset",
    "dequantize",
    "digits_split_indices",
    "display_uint8",
    "epoch_seed",
    "extract_archive",
    "find_tree",
    "load_dataset",
    "load_imagefolder",
    "make_loader",
    "make_synthetic",
    "paper_augmentation",
    "read_image",
    "set_loader_epoch",
    "subsample_per_class",
    "to_uint8",
    "write_imagefolder",
]
