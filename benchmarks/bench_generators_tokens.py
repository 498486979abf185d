"""Token generators: GPT sampling with and without the KV cache and against transformers' ``generate``
on the same-size Llama, GPT training-step throughput, and MaskGIT images/s at 8 steps.

Full size is DiGIT-base's width on CUDA (16 × 1024); on a CPU a 4 × 256 model keeps the cache-less
run (which re-reads the whole prefix at each of the 256 steps) within minutes. Tiny otherwise.

Like for like: the same weights, both in eval mode without gradients, both drawing from the full
softmax at temperature 1 (transformers' default top-k of 50 is switched off; it suppresses the
class/null rows that our head does not have), the same number of new tokens, and transformers with
its default cache (``DynamicCache``) and attention (SDPA). Ours and transformers run interleaved,
round by round, so that the load of a shared machine hits both alike; on CUDA the compiled step
(``compile=True``: CUDA graphs) runs beside them.
"""

import pytest
import torch

from latentforge_generators.gpt import GPT, load_llama
from latentforge_generators.maskgit import MaskGIT

VOCAB, CLASSES = 1024, 10


@pytest.fixture(scope="module")
def shape(full):
    """(grid side, batch): 256-token sequences at batch 16; 64 tokens at batch 4 in the tiny run."""
    return (16, 16) if full else (8, 4)


@pytest.fixture(scope="module", autouse=True)
def threads(full):
    """The tiny run is all dispatch overhead: one thread avoids contention on a shared runner."""
    before = torch.get_num_threads()
    if not full:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def size(full, device):
    if not full:
        return dict(dim=64, depth=2, num_heads=4, ffn_dim=128)
    if device.type == "cuda":
        return dict(dim=1024, depth=16, num_heads=16, ffn_dim=2816)
    return dict(dim=256, depth=4, num_heads=4, ffn_dim=704)


def params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


@pytest.fixture(scope="module")
def models(full, device, shape):
    cfg, (grid, _) = size(full, device), shape
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = (
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB + CLASSES + 1,
                hidden_size=cfg["dim"],
                intermediate_size=cfg["ffn_dim"],
                num_hidden_layers=cfg["depth"],
                num_attention_heads=cfg["num_heads"],
                num_key_value_heads=cfg["num_heads"],
                max_position_embeddings=grid * grid + 1,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=0,
            )
        )
        .to(device)
        .eval()
    )
    ours = (
        load_llama(llama.state_dict(), vocab_size=VOCAB, grid_size=grid, num_heads=cfg["num_heads"])
        .to(device)
        .eval()
    )
    return llama, ours


@pytest.mark.headline
def test_gpt_sampling(measure_interleaved, models, device, shape):
    llama, ours = models
    grid, batch = shape
    y = torch.arange(batch, device=device) % CLASSES
    n = grid * grid
    start, suppress = (y + VOCAB)[:, None], list(range(VOCAB, VOCAB + CLASSES + 1))

    def transformers():
        with torch.no_grad():
            out = llama.generate(
                input_ids=start,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                suppress_tokens=suppress,
            )
        assert out.shape == (batch, 1 + n)

    def sample(**options):
        def fn():
            assert ours.sample(y, temperature=1.0, **options).shape == (batch, grid, grid)

        return fn

    impls = {"ours": sample(), "transformers": transformers}
    if device.type == "cuda":
        impls["ours (compiled step)"] = sample(compile=True)
    measure_interleaved(
        impls,
        group=f"gpt sampling, {n} tokens x batch {batch}",
        items=batch * n,
        unit="tokens/s",
        flops=2 * params(ours) * batch * n,
    )


def test_gpt_sampling_without_cache(measure, models, device, shape):
    """The reference path (the whole prefix again at every step), once: the cache's gain."""
    _, ours = models
    grid, batch = shape
    y = torch.arange(batch, device=device) % CLASSES
    out = measure(
        lambda: ours.sample(y, temperature=1.0, use_cache=False),
        group=f"gpt sampling, {grid * grid} tokens x batch {batch}",
        impl="ours (no KV cache)",
        items=batch * grid * grid,
        unit="tokens/s",
        flops=2 * params(ours) * batch * grid * grid,
        rounds=1,
    )
    assert out.shape[0] == batch


@pytest.mark.parametrize("style", ["digit", "modern"])
def test_gpt_training_step(measure, full, device, shape, style):
    cfg, (grid, batch) = size(full, device), shape
    model = GPT(vocab_size=VOCAB, grid_size=grid, num_classes=CLASSES, style=style, **cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (batch, grid, grid), device=device)
    y = torch.arange(batch, device=device) % CLASSES

    def step():
        loss = model.loss(tokens, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    n = batch * grid * grid
    measure(
        step,
        group=f"gpt training step ({style})",
        impl="ours",
        items=n,
        unit="tokens/s",
        flops=6 * params(model) * n,
    )


def test_maskgit_sampling(measure, full, device, shape):
    cfg, (grid, batch) = size(full, device), shape
    model = (
        MaskGIT(vocab_size=VOCAB, grid_size=grid, num_classes=CLASSES, style="modern", **cfg)
        .to(device)
        .eval()
    )
    y = torch.arange(batch, device=device) % CLASSES
    out = measure(
        lambda: model.sample(y, steps=8),
        group="maskgit sampling, 8 steps",
        impl="ours",
        items=batch,
        unit="images/s",
        flops=8 * 2 * params(model) * batch * (grid * grid + 1),
    )
    assert out.shape == (batch, grid, grid)
