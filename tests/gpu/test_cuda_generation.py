"""On a CUDA device: the generator stage uses it, in bf16, and real KOALA shapes run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from bench.architectures import build_random_pipeline
from koala_batch.spec import spec_from_dict
from koala_batch.stages.generate import GenerateImages
from tests.conftest import tiny_spec


def test_generator_stage_runs_on_cuda_in_bfloat16(model_cache):
    spec = spec_from_dict(tiny_spec("in.parquet", "out"))
    stage = GenerateImages(spec)
    assert stage.device.type == "cuda"
    assert stage.pipeline.unet.dtype == torch.bfloat16
    table = pa.table(
        {
            "prompt": ["a cat", "a dog"],
            "negative_prompt": [None, None],
            "seed": pa.array([1, 2], pa.uint64()),
            "status": ["ok", "ok"],
            "error": pa.array([None, None], pa.string()),
        }
    )
    out = stage(table)
    assert out.column("status").to_pylist() == ["ok", "ok"]
    pixels = out.column("pixels").to_pylist()
    assert all(len(p) == 64 * 64 * 3 for p in pixels)


def test_koala_lightning_700m_architecture_generates_1024px():
    pipeline = build_random_pipeline("koala-lightning-700m", dtype=torch.bfloat16, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    images = pipeline(
        ["a photo of a koala"],
        num_inference_steps=2,
        guidance_scale=3.5,
        width=1024,
        height=1024,
        generator=generator,
        output_type="np",
    ).images
    assert images.shape == (1, 1024, 1024, 3)
    assert np.isfinite(images).all()
