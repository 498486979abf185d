"""latentforge-tokenizers: K-Means over SSL features (DiGIT), VQGAN, VA-VAE, RAE; LPIPS, GAN losses."""

from latentforge_tokenizers.kmeans import KMeans, KMeansTokenizer, load_centroids, save_centroids
from latentforge_tokenizers.lpips import LPIPS
from latentforge_tokenizers.rae import RAE, RAEDecoder
from latentforge_tokenizers.stats import LatentStats
from latentforge_tokenizers.vavae import VAVAE
from latentforge_tokenizers.vqgan import VQGAN

__version__ = "0.1.0"

__all__ = [
    "LPIPS",
    "RAE",
    "VAVAE",
    "VQGAN",
    "KMeans",
    "KMeansTokenizer",
    "LatentStats",
    "RAEDecoder",
    "load_centroids",
    "save_centroids",
]
