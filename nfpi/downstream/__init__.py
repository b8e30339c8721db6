"""Downstream: what a trained flow is used for besides NF-Acc (paper section 5.3).

Owns everything that consumes a trained flow and its prior (read with
:func:`nfpi.checkpoint.load_trained`, never through the training loop): drawing labelled
datasets from the flow and reading them back (:mod:`.generate`, :mod:`.generated`), the CNN-Acc
classifier, its model and its batch augmentations (:mod:`.classifier`, :mod:`.models`,
:mod:`.augment`), the per-class latent PCA and the NF augmentation built on it (:mod:`.pca`,
:mod:`.nf_augment`), NF-augmented pools served as a dataset (:mod:`.pool`), and the
downstream run that chains them for Tables 2-3 and 5-6
(:mod:`.run`, :func:`run_downstream`). Pure PyTorch (and timm); nothing here imports Ray or
MLflow.
"""

from nfpi.downstream.augment import BatchAutoAugment, BatchCropFlip, BatchRandAugment
from nfpi.downstream.classifier import (
    ClassifierConfig,
    ClassifierResult,
    channel_stats,
    evaluate_classifier,
    evaluate_topk,
    train_classifier,
)
from nfpi.downstream.generate import GenerationConfig, generate_dataset, sample_latents
from nfpi.downstream.generated import GeneratedDataset
from nfpi.downstream.models import UInt8Classifier, build_classifier, load_pretrained
from nfpi.downstream.nf_augment import NFAugment, NFAugmentConfig
from nfpi.downstream.pca import ClassPCA
from nfpi.downstream.pool import PoolConfig, PooledNFDataset, PoolStore, pooled_dataset
from nfpi.downstream.run import DownstreamConfig, DownstreamResult, run_downstream

__all__ = [
    "BatchAutoAugment",
    "BatchCropFlip",
    "BatchRandAugment",
    "ClassPCA",
    "ClassifierConfig",
    "ClassifierResult",
    "DownstreamConfig",
    "DownstreamResult",
    "GeneratedDataset",
    "GenerationConfig",
    "NFAugment",
    "NFAugmentConfig",
    "PoolConfig",
    "PoolStore",
    "PooledNFDataset",
    "UInt8Classifier",
    "build_classifier",
    "channel_stats",
    "evaluate_classifier",
    "evaluate_topk",
    "generate_dataset",
    "load_pretrained",
    "pooled_dataset",
    "run_downstream",
    "sample_latents",
    "train_classifier",
]
