"""latentforge-metrics: metrics: FID, IS, sFID, precision/recall, rFID, PSNR/SSIM, FD-DINOv2 and linear probe, faithful to the reference tools"""

__version__ = "0.1.0"
