"""What the two discrete tokenizers share: nearest-codeword search and token-id checks.

Both K-Means centroids and a VQGAN codebook turn a vector into the id of its nearest codeword in
squared L2.  The distance is expanded as ||x||² − 2x·c + ||c||² so that the work is one matmul per
block of rows (as DiGIT and taming do; ``latentforge_core.distances``, oneDNN on CPU), computed in
fp32 whatever the input dtype, because bf16 distances flip near-tie assignments.
"""

from __future__ import annotations

import torch

from latentforge_core.distances import row_blocks
from latentforge_core.errors import InputError, InputTypeError, checking_values


def check_codebook(codebook: torch.Tensor, what: str = "codebook") -> None:
    if codebook.ndim != 2 or codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty [K, D] matrix, got shape {tuple(codebook.shape)}")
    if not codebook.is_floating_point():
        raise InputTypeError(f"{what} must be floating point, got {codebook.dtype}")


def nearest(
    x: torch.Tensor,
    codebook: torch.Tensor,
    codebook_sqnorm: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
    with_distances: bool = True,
    what: str = "features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ids (int64) and squared distances (fp32) of the nearest codeword for each row of ``x [N, D]``.

    ``with_distances=False`` returns ``(ids, None)`` and skips the ‖x‖² pass the distances need.
    """
    check_codebook(codebook)
    if x.ndim != 2:
        raise InputError(f"{what} must be a [N, D] matrix, got shape {tuple(x.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise InputError(
            f"{what} have width {x.shape[1]} but the codebook holds {codebook.shape[0]} vectors of width "
            f"{codebook.shape[1]}; encode with the encoder/feature selection the codebook was fitted on"
        )
    codebook = codebook.float()
    x = x.to(device=codebook.device, dtype=torch.float32)
    if codebook_sqnorm is not None:
        codebook_sqnorm = codebook_sqnorm.float().reshape(-1)  # K
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if with_distances else None
    for start, block, partial in row_blocks(x, codebook, codebook_sqnorm, chunk_rows):
        stop = start + block.shape[0]
        if dist is None:
            torch.argmin(partial, dim=1, out=ids[start:stop])
            continue
        best, _ = torch.min(partial, dim=1, out=(dist[start:stop], ids[start:stop]))
        # ||x||² added after the argmin: it does not change which codeword wins.
        best.add_(block.square().sum(1)).clamp_min_(0.0)
    return ids, dist


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise if ``tokens`` are not integer ids in ``[0, vocab_size)``."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputTypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0 or not checking_values():
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise InputError(
            f"token ids must lie in [0, {vocab_size}) for this vocabulary of {vocab_size}, "
            f"got values in [{low}, {high}]"
        )
