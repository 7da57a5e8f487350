"""Generation stage: an actor holding one StableDiffusionXLPipeline, several prompts per call.

Every image gets its own torch.Generator seeded from its row, so a sample's pixels do
not depend on which batch, actor or retry produced it. A batch that raises (out of
memory, say) is split in halves and retried; an image that still fails, or comes out
with NaN pixels, becomes an error row rather than a failed job.

The actor takes two batches at once (`CALLS_PER_ACTOR`): one holds the pipeline while
the other encodes its images, so the accelerator does not wait on compression and only
compressed bytes leave the actor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from koala_batch.config import JobSpec
from koala_batch.encode import ImageEncoder
from koala_batch.model import load_pipeline, pick_device
from koala_batch.schemas import STATUS_ERROR, STATUS_OK, Col, require_columns

logger = logging.getLogger(__name__)


_NEEDED_COLUMNS = (Col.STATUS, Col.ERROR, Col.PROMPT, Col.NEGATIVE_PROMPT, Col.SEED)

# Concurrent calls per generator actor: one generating, one encoding (and handing over).
CALLS_PER_ACTOR = 2


class ImageGenerationError(RuntimeError):
    """One image could not be generated; the message is the reason recorded in the manifest."""


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8 exactly as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


class GenerateImages:
    """Actor stage: work rows in, the same rows with their encoded `image` out."""

    def __init__(self, spec: JobSpec, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = pick_device()
        self.steps = spec.resolved_steps
        self.guidance_scale = spec.resolved_guidance_scale
        self.width = spec.generation.width
        self.height = spec.generation.height
        self.encoder = ImageEncoder(spec.output.image_format, spec.output.quality)
        # The pipeline (and its tokenizers) serve one call at a time; encoding does not
        # need them and runs beside.
        self.pipeline_lock = threading.Lock()
        self.pipeline = self.load_model(spec)
        logger.info("generator ready on %s (%s)", self.device, spec.model.name)

    def load_model(self, spec: JobSpec) -> Any:
        """The pipeline this actor runs (a benchmark's simulated generator returns None)."""
        return load_pipeline(
            spec.model.name,
            dtype=spec.model.dtype,
            revision=spec.model.revision,
            variant=spec.model.variant,
            device=self.device,
        )

    # One call of the pipeline: the part tests and fault injection replace.
    def run_pipeline(
        self, prompts: list[str], negative_prompts: list[str | None] | None, seeds: list[int]
    ) -> np.ndarray:
        import torch

        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        with torch.inference_mode():
            result = self.pipeline(
                prompt=prompts,
                negative_prompt=negative_prompts,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                width=self.width,
                height=self.height,
                generator=generators,
                output_type="np",
            )
        return np.asarray(result.images)

    def truncated_prompts(self, prompts: list[str | None]) -> list[bool]:
        """For each prompt, whether CLIP will cut it at its 77-token limit (one tokenizer
        call per tokenizer for the whole batch)."""
        present = [i for i, prompt in enumerate(prompts) if prompt is not None]
        truncated = [False] * len(prompts)
        for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2):
            if tokenizer is None or not present:
                continue
            encoded = tokenizer([prompts[i] for i in present], truncation=False, verbose=False)
            for i, ids in zip(present, encoded.input_ids, strict=True):
                truncated[i] = truncated[i] or len(ids) > tokenizer.model_max_length
        return truncated

    def generate(
        self, prompts: list[str], negatives: list[str | None], seeds: list[int]
    ) -> list[np.ndarray | ImageGenerationError]:
        """Images (uint8 HxWx3) or the error for each request, splitting batches that fail."""
        results: list[np.ndarray | ImageGenerationError] = [None] * len(prompts)  # type: ignore[list-item]
        # Rows with and without a negative prompt differ in kind (SDXL zeroes an absent
        # negative), so they go to separate calls: a row's pixels never depend on its
        # batch neighbours.
        groups: dict[bool, list[int]] = {}
        for index, negative in enumerate(negatives):
            groups.setdefault(negative is not None, []).append(index)
        for has_negative, indices in groups.items():
            self._generate_split(
                indices, prompts, negatives if has_negative else None, seeds, results
            )
        return results

    def _generate_split(
        self,
        indices: Sequence[int],
        prompts: list[str],
        negatives: Sequence[str | None] | None,
        seeds: list[int],
        results: list[Any],
    ) -> None:
        try:
            with self.pipeline_lock:
                images = self.run_pipeline(
                    [prompts[i] for i in indices],
                    [negatives[i] for i in indices] if negatives is not None else None,
                    [seeds[i] for i in indices],
                )
        except Exception as exc:  # noqa: BLE001 - every failure is retried smaller or recorded
            self._release_memory()
            if len(indices) > 1:
                logger.warning(
                    "batch of %d failed (%s: %s); retrying in halves",
                    len(indices),
                    type(exc).__name__,
                    exc,
                )
                middle = len(indices) // 2
                self._generate_split(indices[:middle], prompts, negatives, seeds, results)
                self._generate_split(indices[middle:], prompts, negatives, seeds, results)
                return
            reason = f"{type(exc).__name__}: {exc}".strip()
            results[indices[0]] = ImageGenerationError(reason[:2000])
            return
        non_finite = []
        for position, index in enumerate(indices):
            image = images[position]
            if np.isfinite(image).all():
                results[index] = to_uint8(image)
            else:
                non_finite.append(index)
        if len(indices) > 1:
            # NaN latents can come from the batch (an fp16 overflow, say): retry each alone.
            for index in non_finite:
                self._generate_split([index], prompts, negatives, seeds, results)
            return
        for index in non_finite:
            results[index] = ImageGenerationError(
                "generated image has NaN or infinite values (would decode as black)"
            )

    def _release_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(table, _NEEDED_COLUMNS, "generate")
        statuses = table.column(Col.STATUS).to_pylist()
        errors = table.column(Col.ERROR).to_pylist()
        prompts = table.column(Col.PROMPT).to_pylist()
        negatives = table.column(Col.NEGATIVE_PROMPT).to_pylist()
        seeds = table.column(Col.SEED).to_pylist()
        todo = [i for i, status in enumerate(statuses) if status == STATUS_OK]
        images: list[bytes | None] = [None] * table.num_rows
        digests: list[str | None] = [None] * table.num_rows
        sizes = [0] * table.num_rows
        generated_at = [time.time()] * table.num_rows  # error rows: when they were seen
        outcomes = (
            self.generate(
                [prompts[i] for i in todo], [negatives[i] for i in todo], [seeds[i] for i in todo]
            )
            if todo
            else []
        )
        with self.pipeline_lock:
            truncated = self.truncated_prompts(prompts)
        finished = time.time()
        for row, outcome in zip(todo, outcomes, strict=True):
            generated_at[row] = finished
            if isinstance(outcome, ImageGenerationError):
                statuses[row] = STATUS_ERROR
                errors[row] = str(outcome)
                continue
            encoded = self.encoder(outcome)
            images[row], digests[row], sizes[row] = encoded.data, encoded.sha256, len(encoded.data)
        table = table.set_column(
            table.schema.get_field_index(Col.STATUS), Col.STATUS, pa.array(statuses, pa.string())
        )
        table = table.set_column(
            table.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string())
        )
        extra = {
            Col.PROMPT_TRUNCATED: pa.array(truncated, pa.bool_()),
            Col.IMAGE: pa.array(images, pa.binary()),
            Col.SHA256: pa.array(digests, pa.string()),
            Col.BYTES: pa.array(sizes, pa.int64()),
            Col.GENERATED_AT: pa.array(generated_at, pa.float64()),
        }
        for name, values in extra.items():
            table = table.append_column(name, values)
        return table
