"""Sampling over discrete tokens: top-k / top-p / temperature, and MaskGIT's parallel decoding.

Shared by the autoregressive GPT, MaskGIT and DiGIT's second stage so that every token generator
filters logits and schedules its unmasking the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from latentforge_core.errors import InputError, checking_values

#################################################################################
#                               Argument checks                                 #
#################################################################################


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise a ``ValueError`` naming the bad sampler setting and the range it must lie in."""
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 (or None to disable it), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must lie in (0, 1] (or be None to disable it), got {top_p!r}")


def check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str = "token ids") -> None:
    """Integer ids in ``[0, vocab_size)``, or a ``ValueError`` that says which values were not."""
    if tokens.dtype in (torch.bool,) or tokens.is_floating_point() or tokens.is_complex():
        raise InputError(f"{what} must be an integer tensor, got dtype {tokens.dtype}")
    if checking_values() and tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise InputError(
            f"{what} must lie in [0, {vocab_size}), got values in [{int(tokens.min())}, {int(tokens.max())}]"
        )


def check_class_ids(y: torch.Tensor, num_classes: int) -> None:
    if num_classes == 0:
        raise InputError("this model is unconditional (num_classes=0); pass y=None or a sample count")
    if y.ndim != 1 or y.is_floating_point():
        raise InputError(f"class labels must be a 1-D integer tensor [B], got {tuple(y.shape)} {y.dtype}")
    if checking_values() and y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(
            f"class ids must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )


def as_sequence(tokens: torch.Tensor, grid: tuple[int, int], vocab_size: int) -> torch.Tensor:
    """Token grids ``[B, h, w]`` or sequences ``[B, h*w]`` → checked raster sequences ``[B, h*w]``."""
    n = grid[0] * grid[1]
    if tokens.ndim == 3 and tuple(tokens.shape[1:]) == tuple(grid):
        tokens = tokens.flatten(1)
    elif not (tokens.ndim == 2 and tokens.shape[1] == n):
        raise InputError(
            f"expected token grids [B, {grid[0]}, {grid[1]}] or sequences [B, {n}], got {tuple(tokens.shape)}"
        )
    check_token_ids(tokens, vocab_size)
    return tokens.long()


#################################################################################
#                           Top-k / top-p sampling                              #
#################################################################################


def _elsewhere(generator: torch.Generator | None, device) -> bool:
    """A generator of another device than the draws' (a CPU one seeding GPU sampling, as the flow
    samplers allow): the draws are then made where the generator lives and moved."""
    return generator is not None and device is not None and generator.device.type != torch.device(device).type


def uniform(shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.rand(shape)`` on ``device``, from ``generator`` whichever device that lives on."""
    if _elsewhere(generator, device):
        return torch.rand(shape, device=generator.device, generator=generator).to(device)
    return torch.rand(shape, device=device, generator=generator)


def top_candidates(
    logits: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    log_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits that survive top-k and the nucleus of mass ``top_p``: ``(values, ids)``.

    With a filter, ``values [..., k]`` are sorted in descending order and ``ids`` say which
    vocabulary entries they are (``None`` without a filter: ``values`` is ``logits``). Top-k keeps
    exactly k (``topk``, as fairseq's sampler does), so with top-k set the vocabulary is never
    sorted. The nucleus keeps the tokens whose preceding cumulative probability is below
    ``top_p`` (so the token that crosses ``top_p`` stays), fairseq's rule that DiGIT's stage 2
    samples with; dropped ones become -inf.

    ``log_norm [..., 1]`` (optional) is the log-normaliser the nucleus is measured in, for logits
    that are a slice of a larger vocabulary whose other entries may never be drawn: fairseq takes
    the log-softmax over its whole dictionary, sets the specials to -inf and applies top-p to those
    probabilities without renormalising, so the codes' mass is ``exp(logits - log_norm)`` and sums
    to less than 1. Without it the nucleus is measured in ``softmax(logits)``.
    """
    ids = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # ..., k
    if top_p is not None and top_p < 1.0:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1) if log_norm is None else (logits - log_norm).exp()
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    return logits, ids


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` with -inf everywhere outside ``top_candidates`` (same shape)."""
    values, ids = top_candidates(logits, top_k, top_p)
    if ids is None:
        return values
    return torch.full_like(logits, float("-inf")).scatter(-1, ids, values)


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    excluded_logits: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one id per row of ``logits [..., V]`` → ``[...]``.

    ``excluded_logits [..., S]`` (optional): logits of vocabulary entries that are never drawn but
    share the softmax with ``logits`` (fairseq's specials, set to -inf after its log-softmax); the
    nucleus of ``top_p`` is then measured in that full-vocabulary mass at ``temperature``
    (``top_candidates``' ``log_norm``). Without them, or without ``top_p``, nothing changes.

    ``noise`` (optional, decoding loops): a preallocated float buffer of the draws' shape
    (``[B*, min(top_k, V)]``) that the uniform draws overwrite, instead of a fresh tensor per call;
    the draws are the same numbers.

    Gumbel-max: argmax(logits/T + Gumbel noise) is an exact draw from softmax(logits/T) that needs
    neither the softmax nor the exponential draw inside ``multinomial`` (which cost as much as a
    transformer layer per decoding step of a small model). ``top_k=1`` is greedy.
    """
    shape = logits.shape[:-1]
    logits = logits.float().flatten(0, -2)  # (B*), V
    if top_k == 1:
        return logits.argmax(dim=-1).view(shape)
    log_norm = None
    if excluded_logits is not None and top_p is not None and top_p < 1.0:
        full = torch.cat([logits, excluded_logits.float().flatten(0, -2)], dim=-1) / temperature
        log_norm = full.logsumexp(dim=-1, keepdim=True)  # (B*), 1
    if temperature != 1.0:
        logits = logits / temperature
    values, ids = top_candidates(logits, top_k, top_p, log_norm)
    if noise is not None and noise.shape != values.shape:
        raise InputError(
            f"noise buffer {tuple(noise.shape)} must have the draws' shape {tuple(values.shape)}"
        )
    if noise is not None and not _elsewhere(generator, values.device):
        u = noise.uniform_(generator=generator)  # torch.rand's draws, in place
    else:
        u = uniform(values.shape, values.device, generator)
    pick = (values - u.log_().neg_().log_()).argmax(dim=-1, keepdim=True)  # -log(-log u) ~ Gumbel
    if ids is not None:
        pick = ids.gather(-1, pick)
    return pick.view(shape)


#################################################################################
#                          MaskGIT mask schedule and decoding                   #
#################################################################################


def training_mask_counts(
    batch: int, n: int, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """How many of ``n`` tokens to mask per example: floor(n·cos(π u / 2) + 1), u ~ U[0, 1)."""
    u = uniform(batch, device, generator)
    return torch.floor(n * torch.cos(math.pi / 2 * u) + 1).long().clamp(1, n)  # B


def random_mask(counts: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask ``[B, n]`` with ``counts[b]`` positions set, chosen uniformly at random."""
    scores = uniform((counts.shape[0], n), counts.device, generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]  # B n


def remaining_masked(n: int, step: int, steps: int) -> int:
    """Tokens still masked after ``step`` of ``steps`` under the cosine schedule (before clamping)."""
    return math.floor(n * math.cos(math.pi / 2 * step / steps))


def maskgit_decode(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    masked: torch.Tensor,
    *,
    mask_id: int,
    steps: int = 8,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Iterative parallel decoding: sample every masked token, keep the most confident ones.

    ``logits_fn(tokens [B, N]) -> [B, N, V]``; ``masked [B, N]`` marks unknown positions. Each
    step samples all positions, writes the samples into masked ones, scores them by log-prob plus
    Gumbel noise at temperature ``choice_temperature·(1 - s/steps)`` and re-masks the
    ``floor(N0·cos(π/2·s/steps))`` least confident, clamped to [1, #masked - 1] (N0: the initial
    masked count). With 256 tokens and 8 steps that leaves 251, 236, 212, 181, 142, 97, 49, 0.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    check_sampling(temperature)
    if choice_temperature < 0:
        raise InputError(f"choice_temperature must be >= 0, got {choice_temperature}")
    masked = masked.clone()
    initial = masked.sum(dim=1)  # B
    tokens = tokens.masked_fill(masked, mask_id)
    for step in range(1, steps + 1):
        logits = logits_fn(tokens).float()  # B N V
        if temperature != 1.0:
            logits = logits / temperature
        probs = logits.softmax(-1).flatten(0, 1)
        if _elsewhere(generator, probs.device):
            sampled = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
        else:
            sampled = torch.multinomial(probs, 1, generator=generator)
        sampled = sampled.view(masked.shape)
        tokens = torch.where(masked, sampled, tokens)
        if step == steps:
            break
        logp = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)  # B N
        u = uniform(logp.shape, logp.device, generator).clamp_(1e-20, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        confidence = logp + choice_temperature * (1 - step / steps) * gumbel
        confidence = confidence.masked_fill(~masked, float("inf"))
        target = torch.floor(initial.double() * math.cos(math.pi / 2 * step / steps)).long()
        count = torch.minimum(masked.sum(dim=1) - 1, target).clamp(min=1)  # B
        ranks = confidence.argsort(dim=1).argsort(dim=1)
        masked = ranks < count[:, None]
        tokens = tokens.masked_fill(masked, mask_id)
    return tokens


def cfg_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch stacked as [conditional; unconditional]."""
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


def cfg_logits_(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``cfg_logits`` written over the conditional half of fp32 ``logits`` (a decoding step's own
    output): the same numbers, as ``+`` and ``·`` commute exactly, with no new tensor."""
    cond, uncond = logits.chunk(2)
    return cond.sub_(uncond).mul_(scale).add_(uncond)


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-token mean of (1-ε)·NLL + ε·mean(-log p) over the vocabulary (DiGIT's criterion)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), label_smoothing=smoothing)
