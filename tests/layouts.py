"""State dicts in the official key layouts of released checkpoints, filled with random values, for
tests that load, convert or sample "released" files without downloading any."""

import torch


def _fairseq_layers(sd, r, dim, depth):
    """fairseq ``TransformerDecoderLayer`` keys (DiGIT's stages), ``decoder.layers.<i>.*``."""
    for i in range(depth):
        p = f"decoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = r(dim, dim), r(dim)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = r(4 * dim, dim), r(4 * dim)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = r(dim, 4 * dim), r(dim)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + r(dim), r(dim)
    return sd


def _normal(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g) * 0.2


def random_fairseq_stage1(K, classes, dim, depth, positions=1024, seed=0):
    """DiGIT's stage-1 (``stlm``) layout, as in ``checkpoint['model']``: one table [5 specials + K tokens
    + classes], learned positions, post-LN layers, plus the centroids and encoder it carries."""
    r = _normal(seed)
    sd = {
        "decoder.embed_tokens.weight": r(K + 5 + classes, dim),
        "decoder.embed_positions.weight": r(positions + 2, dim),
        "decoder.output_projection.weight": r(K + 5, dim),
        "decoder.version": torch.tensor([3.0]),
        "centroids": r(8, K),
        "centroid_norm": r(1, K),
        "pretrained_encoder.cls_token": r(1, 1, 8),
    }
    return _fairseq_layers(sd, r, dim, depth)


def random_fairseq_stage2(V, K, dim, depth, positions=1024, seed=0):
    """DiGIT's ``st2vtlm`` layout: one table [5 specials + V codes | 5 specials + K tokens], two position
    tables, pre-LN layers and a final LayerNorm, plus the frozen VQGAN/encoder/centroids it carries."""
    r = _normal(seed)
    sd = {
        "decoder.embed_tokens.weight": r(V + 5 + K + 5, dim),
        "decoder.embed_positions.weight": r(positions + 2, dim),
        "decoder.embed_positions_1.weight": r(positions + 2, dim),
        "decoder.layer_norm.weight": 1 + r(dim),
        "decoder.layer_norm.bias": r(dim),
        "decoder.output_projection.weight": r(V + 5, dim),
        "decoder.version": torch.tensor([3.0]),
        "centroids": r(8, K),
        "centroid_norm": r(1, K),
        "vqgan.quantize.embedding.weight": r(V, 4),
        "pretrained_encoder.pos_embed": r(1, 5, 8),
    }
    return _fairseq_layers(sd, r, dim, depth)


def write_lightningdit_release(path, backbone_state, seed=0):
    """LightningDiT's training checkpoint as its ``train.py`` saves it (``inference.py`` takes
    ``checkpoint['ema']`` when present): ``{"model", "ema", "opt", "config"}`` over ``backbone_state``'s
    keys (official names: ``pos_embed`` and the ``feat_rope.freqs_*`` buffers included). The learned
    weights are random in both (a built model's zero-initialised adaLN would make a velocity of zero),
    ``model``'s unlike ``ema``'s, so a loader that takes it instead shows. Returns the EMA state."""
    r = _normal(seed)
    fixed = ("pos_embed", "feat_rope.")  # sin-cos table and RoPE buffers: frozen, saved as built
    states = [
        {k: v if k.startswith(fixed) else r(*v.shape) for k, v in backbone_state.items()} for _ in range(2)
    ]
    torch.save(
        {
            "model": states[1],
            "ema": states[0],
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0, 1]}]},
            "config": {"model": {"model_type": "LightningDiT-XL/1", "use_qknorm": False}, "train": {}},
        },
        path,
    )
    return states[0]


def write_vavae_release(path, state, linear_proj=False, seed=0):
    """The released VA-VAE ``.pt``: a Lightning checkpoint whose ``state_dict`` holds the inference keys
    (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) beside the training-only
    ``loss.*`` and ``foundation_model.*`` (and ``linear_proj.weight`` only with ``linear_proj``)."""
    r = _normal(seed)
    sd = {k: v for k, v in state.items() if linear_proj or not k.startswith("linear_proj.")}
    sd |= {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": r(8, 3, 4, 4),
        "loss.perceptual_loss.net.slice1.0.weight": r(8, 3, 3, 3),
        "foundation_model.model.cls_token": r(1, 1, 8),
        "foundation_model.model.patch_embed.proj.weight": r(8, 3, 14, 14),
    }
    torch.save(
        {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.8.6", "state_dict": sd}, path
    )


def write_latents_stats(path, channels, seed=0):
    """LightningDiT's ``latents_stats.pt``: ``{"mean", "std"}``, each ``[1, C, 1, 1]`` (channel statistics
    of the VA-VAE's latents)."""
    r = _normal(seed)
    torch.save({"mean": r(1, channels, 1, 1), "std": 0.5 + r(1, channels, 1, 1).abs()}, path)
