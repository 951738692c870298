"""Channel alignment (activeguard.watermark.alignment) on synthetic weights and activations: exact recovery of
permutations and positive scales, unmoved by pruning."""

import torch

from activeguard.watermark.alignment import (
    ChannelMatch,
    LayerAlignment,
    aligned_weight,
    block_scales,
    channel_rows,
    match_channels,
)


def test_match_channels_recovers_a_permutation_and_positive_scales():
    g = torch.Generator().manual_seed(0)
    owner = torch.randn(64, 8, 5, 5, generator=g)
    order = torch.randperm(8, generator=g)
    scale = torch.rand(8, generator=g) * 1.5 + 0.5
    suspect = torch.empty_like(owner)
    suspect[:, order] = owner * scale.view(1, -1, 1, 1)  # suspect channel order[i] = scale[i] × owner channel i
    match = match_channels(channel_rows(owner, False), channel_rows(suspect, False))
    assert torch.equal(match.order, order)
    assert torch.allclose(match.scale, scale, rtol=1e-5)
    assert float(match.similarity.min()) > 0.9999


def test_block_scales_fit_rank_one_ratios_and_ignore_pruned_weights():
    g = torch.Generator().manual_seed(1)
    owner = torch.randn(16, 6, 5, 5, generator=g)
    s, t = torch.rand(16, generator=g) + 0.5, torch.rand(6, generator=g) + 0.5
    suspect = owner * (s[:, None] / t[None, :]).view(16, 6, 1, 1)
    pruned = suspect * (torch.rand(suspect.shape, generator=g) > 0.8)  # 80% of the weights zeroed
    for weights in (suspect, pruned):
        assert torch.allclose(block_scales(weights, owner), s[:, None] / t[None, :], rtol=1e-4)
    assert torch.allclose(block_scales(owner * (torch.rand(owner.shape, generator=g) > 0.9), owner), torch.ones(16, 6))


def test_aligned_weight_reads_a_permuted_rescaled_layer_in_the_owners_frame():
    g = torch.Generator().manual_seed(2)
    owner = torch.randn(16, 6, 5, 5, generator=g)
    out_order, in_order = torch.randperm(16, generator=g), torch.randperm(6, generator=g)
    s, t = torch.rand(16, generator=g) + 0.5, torch.rand(6, generator=g) + 0.5
    suspect = torch.empty_like(owner)
    scaled = owner * (s[:, None] / t[None, :]).view(16, 6, 1, 1)
    suspect[out_order[:, None], in_order[None, :]] = scaled
    alignment = LayerAlignment(
        outputs=ChannelMatch(out_order, torch.ones(16), torch.ones(16)),
        inputs=ChannelMatch(in_order, torch.ones(6), torch.ones(6)),
        reference_weight=owner,
    )
    assert torch.allclose(aligned_weight(suspect, alignment), owner, atol=1e-5)
