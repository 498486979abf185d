"""latentforge-metrics: FID, IS, sFID, KID, precision/recall, rFID, PSNR/SSIM, FD-DINOv2 and linear probe,
numerically faithful to the reference tools, with the protocol of each number explicit."""

from latentforge_metrics.generative import (
    FID,
    KID,
    RFID,
    SFID,
    FDDINOv2,
    InceptionScore,
    PrecisionRecall,
    evaluate_npz,
    inception_score,
    inception_score_adm,
    kernel_inception_distance,
    precision_recall,
)
from latentforge_metrics.inception import PROTOCOLS, FIDInceptionV3, fid_inception_v3, preprocess
from latentforge_metrics.npz import (
    KNOWN_REFERENCES,
    ReferenceFileError,
    SampleWriter,
    iter_npz_images,
    load_reference,
    save_fid_stats,
    save_reference,
    save_samples,
    verify_reference,
)
from latentforge_metrics.probe import LinearProbe
from latentforge_metrics.reconstruction import PSNR, SSIM, psnr, ssim
from latentforge_metrics.stats import GaussianStats, frechet_distance

__version__ = "0.1.0"

__all__ = [
    "FDDINOv2",
    "FID",
    "FIDInceptionV3",
    "GaussianStats",
    "InceptionScore",
    "KID",
    "KNOWN_REFERENCES",
    "LinearProbe",
    "PROTOCOLS",
    "PSNR",
    "PrecisionRecall",
    "RFID",
    "ReferenceFileError",
    "SFID",
    "SSIM",
    "SampleWriter",
    "evaluate_npz",
    "fid_inception_v3",
    "frechet_distance",
    "inception_score",
    "inception_score_adm",
    "iter_npz_images",
    "kernel_inception_distance",
    "load_reference",
    "precision_recall",
    "preprocess",
    "psnr",
    "save_fid_stats",
    "save_reference",
    "save_samples",
    "ssim",
    "verify_reference",
]
