"""The random-weight KOALA/SDXL architectures match the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from bench.architectures import UNET_PARAMETERS, build_unet


@pytest.mark.parametrize("name", ["sdxl", "koala-1b", "koala-700m", "koala-lightning-700m"])
def test_unet_parameter_counts_match_the_checkpoints(name):
    with torch.device("meta"):  # shapes only: no memory, no time
        unet = build_unet(name)
    expected = UNET_PARAMETERS[name.replace("lightning-", "")]
    assert sum(p.numel() for p in unet.parameters()) == expected


def test_koala_700m_has_no_mid_block_and_1b_has_one():
    with torch.device("meta"):
        assert build_unet("koala-700m").mid_block is None
        assert build_unet("koala-1b").mid_block is not None


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'koala-9b'"):
        build_unet("koala-9b")


def test_full_random_pipeline_has_sdxl_text_encoders_and_vae():
    from bench.architectures import build_random_pipeline

    pipeline = build_random_pipeline("koala-lightning-700m", device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(pipeline.unet) == UNET_PARAMETERS["koala-700m"]
    assert count(pipeline.text_encoder_2) == 694_659_840  # OpenCLIP bigG, as in SDXL
    assert count(pipeline.vae) == 83_653_863
    assert pipeline.vae_scale_factor == 8
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
