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
