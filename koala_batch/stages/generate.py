"""Generation stage: an actor holding one StableDiffusionXLPipeline, several prompts per call.

Every image gets its own torch.Generator seeded from its row, so a sample's pixels do
not depend on which batch, actor or retry produced it. A batch that raises (out of
memory, say) is split in halves and retried; an image that still fails, or comes out
with NaN pixels, becomes an error row rather than a failed job.

The actor takes two batches at once (`CALLS_PER_ACTOR`): one holds the pipeline while
the other encodes its images, so the accelerator does not wait on compression and only
compressed bytes leave the actor.

Images leave the device as uint8 (converted there, as MLPerf's SDXL harness does): a
quarter of the bytes of float32 pixels cross to the host, into pinned memory.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from koala_batch.errors import GeneratorStartError
from koala_batch.models.accelerations import DeepCache, guidance_cutoff_kwargs
from koala_batch.models.loading import SpeedSettings, load_pipeline, optimize_pipeline, pick_device
from koala_batch.models.weights import is_remote_model, local_copy
from koala_batch.schemas import (
    BUCKET_COLUMNS,
    IMAGE_ROW_FIELDS,
    IMAGE_ROW_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    Col,
    require_columns,
)
from koala_batch.spec import JobSpec, reveal_storage_options
from koala_batch.stages.encode import ImageEncoder
from koala_batch.stages.statistics import GeneratorStats

logger = logging.getLogger(__name__)


_NEEDED_COLUMNS = (
    Col.STATUS,
    Col.ERROR,
    Col.PROMPT,
    Col.NEGATIVE_PROMPT,
    Col.SEED,
    *BUCKET_COLUMNS,
)

# Concurrent calls per generator actor: one generating, one encoding (and handing over).
CALLS_PER_ACTOR = 2


class CallSettings(NamedTuple):
    """The generation parameters of one pipeline call: rows share a call only when theirs
    are equal (one latent shape, one schedule, one guidance per call)."""

    width: int
    height: int
    steps: int
    guidance_scale: float

    def pipeline_kwargs(self) -> dict[str, Any]:
        """As `run_pipeline` (and the diffusers pipeline) takes them."""
        return {
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }


def row_settings(table: pa.Table) -> list[CallSettings]:
    """Each work row's CallSettings, from its bucket columns."""
    columns = [table.column(name).to_pylist() for name in BUCKET_COLUMNS]
    return [CallSettings(*values) for values in zip(*columns, strict=True)]


class ImageGenerationError(RuntimeError):
    """One image could not be generated; the message is the reason recorded in the manifest."""


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8 exactly as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class GeneratedImages:
    """One pipeline call's images as uint8 (N, H, W, 3), and which of them were finite.

    A non-finite image (NaN latents, an overflowing decoder) has meaningless pixels:
    `finite` is checked before they are used.
    """

    pixels: np.ndarray
    finite: np.ndarray

    @classmethod
    def from_float(cls, images: np.ndarray) -> GeneratedImages:
        """From float images in [0, 1], (N, H, W, 3), as diffusers' "np" output gives them."""
        finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
        pixels = to_uint8(np.nan_to_num(np.clip(images, 0.0, 1.0), nan=0.0))
        return cls(pixels=pixels, finite=finite)


def decode_latents(pipeline: Any, latents: Any) -> GeneratedImages:
    """The pipeline's VAE decode and post-processing, ending in uint8 on the device.

    The same arithmetic as StableDiffusionXLPipeline's decode and diffusers' "np"
    post-processing followed by `to_uint8`, so float32 gives the same bytes; the VAE's own
    dtype is used (see model.decode_dtype), never a per-call float32 round trip.
    """
    import torch

    vae = pipeline.vae
    latents = latents.to(vae.dtype)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and (
        getattr(config, "latents_std", None) is not None
    ):
        # One value per latent channel, however many the VAE has.
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if getattr(pipeline, "watermark", None) is not None:
        image = pipeline.watermark.apply_watermark(image)
    image = image.float()
    finite = torch.isfinite(image).flatten(1).all(dim=1)
    pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous()
    if pixels.device.type == "cuda":
        # A non-blocking copy into pinned memory overlaps with what the GPU still has
        # queued; the event waits for this copy only, not for the whole device.
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        finite_host = finite.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return GeneratedImages(pixels=host.numpy(), finite=finite_host.numpy())
    return GeneratedImages(pixels=pixels.numpy(), finite=finite.numpy())


class GenerateImages:
    """Actor stage: work rows in, the same rows with their encoded `image` out.

    `collector`, when given, is a Ray actor handle with a `report(snapshot)` method: after
    every batch the actor sends it its GeneratorStats, from which the job record takes
    each generator's busy fraction.
    """

    def __init__(self, spec: JobSpec, torch_threads: int | None = None, collector: Any = None):
        import torch

        self.stats = GeneratorStats(
            worker=f"{socket.gethostname()}:{os.getpid()}", started_at=time.time()
        )
        self.collector = collector
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = pick_device()
        self.steps = spec.resolved_steps
        self.guidance_scale = spec.resolved_guidance_scale
        self.width = spec.generation.width
        self.height = spec.generation.height
        self.guidance_per_row = spec.input.guidance_scale_column is not None
        self.batch_size = spec.compute.batch_size
        self.default_negative = spec.generation.negative_prompt
        self.encoder = ImageEncoder(
            spec.output.image_format,
            spec.output.quality,
            threads=spec.compute.resolved_encode_threads,
        )
        # The pipeline (and its tokenizers) serve one call at a time; encoding does not
        # need them and runs beside.
        self.pipeline_lock = threading.Lock()
        self.speed = SpeedSettings.resolve(
            self.device,
            channels_last=spec.compute.channels_last,
            fuse_qkv=spec.compute.fuse_qkv,
            compile=spec.compute.compile,
            compile_mode=spec.compute.compile_mode,
            compile_cache_dir=spec.compute.compile_cache_dir,
        )
        self.pipeline = self.load_model(spec)
        self.call_kwargs: dict[str, Any] = {}
        self.deep_cache: DeepCache | None = None
        self.negative_embeddings: tuple[Any, Any] | None = None
        if self.pipeline is not None:
            optimize_pipeline(self.pipeline, self.speed)
            if spec.generation.guidance_cutoff is not None:
                self.call_kwargs.update(guidance_cutoff_kwargs(spec.generation.guidance_cutoff))
            if spec.generation.deep_cache_interval is not None:
                self.deep_cache = DeepCache(self.pipeline.unet, spec.generation.deep_cache_interval)
            self.negative_embeddings = self.encode_default_negative()
            if self.speed.compile:
                self.warm_up()
        self.stats.ready_at = time.time()
        logger.info("generator ready on %s (%s)", self.device, spec.model.name)

    def load_model(self, spec: JobSpec) -> Any:
        """The pipeline this actor runs (a benchmark's simulated generator returns None)."""
        name = spec.model.name
        if is_remote_model(name):  # a fetched copy: the node's actors share one download
            name = str(local_copy(name, reveal_storage_options(spec.model.storage_options)))
        return load_pipeline(
            name,
            dtype=spec.model.dtype,
            revision=spec.model.revision,
            variant=spec.model.variant,
            device=self.device,
            preset=spec.model.preset,
        )

    def encode_default_negative(self) -> tuple[Any, Any] | None:
        """The spec's negative prompt through both text encoders, once per actor.

        Most jobs give every row the same negative prompt: encoding it once saves two
        text-encoder passes per batch. Computed alone (batch of one), as a row whose
        negative differs is too, so a row's pixels do not depend on its neighbours.
        """
        if self.default_negative is None or (
            self.guidance_scale <= 1.0 and not self.guidance_per_row
        ):
            return None
        import torch

        with torch.inference_mode():
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=self.default_negative,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        return embeds, pooled

    def warm_up(self) -> None:
        """One short call at the job's batch shape, so compilation happens before the first
        batch (and a restarted actor loads its kernels from the compile cache)."""
        started = time.time()
        self.run_pipeline(
            ["warm-up"] * self.batch_size,
            [self.default_negative] * self.batch_size if self.default_negative else None,
            list(range(self.batch_size)),
            num_inference_steps=min(2, self.steps),
        )
        logger.info("compiled and warmed up in %.1f s", time.time() - started)

    def prompt_kwargs(
        self, prompts: list[str], negative_prompts: list[str | None] | None
    ) -> dict[str, Any]:
        """The prompt arguments of one call: the cached negative embeddings where they apply."""
        cached = self.negative_embeddings
        if (
            cached is not None
            and negative_prompts is not None
            and all(negative == self.default_negative for negative in negative_prompts)
        ):
            embeds, pooled = cached
            count = len(prompts)
            return {
                "prompt": prompts,
                "negative_prompt_embeds": embeds.expand(count, -1, -1),
                "negative_pooled_prompt_embeds": pooled.expand(count, -1),
            }
        return {"prompt": prompts, "negative_prompt": negative_prompts}

    # One call of the pipeline: the part tests and fault injection replace or extend
    # (extra keyword arguments go to the pipeline call). The generation parameters left
    # out are the spec's.
    def run_pipeline(
        self,
        prompts: list[str],
        negative_prompts: list[str | None] | None,
        seeds: list[int],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        **pipeline_kwargs: Any,
    ) -> GeneratedImages:
        import torch

        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        if self.deep_cache is not None:
            self.deep_cache.reset()
        arguments = {
            **self.prompt_kwargs(prompts, negative_prompts),
            "num_inference_steps": num_inference_steps or self.steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            "width": width or self.width,
            "height": height or self.height,
            "generator": generators,
            "output_type": "latent",
            **self.call_kwargs,
            **pipeline_kwargs,
        }
        with torch.inference_mode():
            latents = self.pipeline(**arguments).images
            return decode_latents(self.pipeline, latents)

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
        self,
        prompts: list[str],
        negatives: list[str | None],
        seeds: list[int],
        settings: Sequence[CallSettings] | None = None,
        spent: list[float] | None = None,
    ) -> list[np.ndarray | ImageGenerationError]:
        """Images (uint8 HxWx3) or the error for each request, splitting batches that fail.

        `settings`: each request's generation parameters (the spec's when None). One
        pipeline call per distinct settings and kind of negative prompt. `spent[0]`, when
        given, grows by the seconds of the calls that succeeded: this request's share of the
        pipeline, which the actor-wide statistics cannot give (two requests run at once).
        """
        results: list[np.ndarray | ImageGenerationError] = [None] * len(prompts)  # type: ignore[list-item]
        default = CallSettings(self.width, self.height, self.steps, self.guidance_scale)
        # Rows with and without a negative prompt differ in kind (SDXL zeroes an absent
        # negative), and rows with other parameters in latent shape, schedule or guidance,
        # so they go to separate calls: a row's pixels never depend on its batch neighbours.
        groups: dict[tuple[CallSettings, bool], list[int]] = {}
        for index, negative in enumerate(negatives):
            bucket = default if settings is None else settings[index]
            groups.setdefault((bucket, negative is not None), []).append(index)
        for (bucket, has_negative), indices in groups.items():
            self._generate_split(
                indices,
                prompts,
                negatives if has_negative else None,
                seeds,
                results,
                bucket,
                spent if spent is not None else [0.0],
            )
        return results

    def _generate_split(
        self,
        indices: Sequence[int],
        prompts: list[str],
        negatives: Sequence[str | None] | None,
        seeds: list[int],
        results: list[Any],
        settings: CallSettings,
        spent: list[float],
    ) -> None:
        try:
            with self.pipeline_lock:
                started = time.time()
                # Durations from the monotonic clock: the wall clock may be stepped (a VM's
                # time sync), which once made a batch's seconds come out as zero.
                clock = time.perf_counter()
                images = self.run_pipeline(
                    [prompts[i] for i in indices],
                    [negatives[i] for i in indices] if negatives is not None else None,
                    [seeds[i] for i in indices],
                    **settings.pipeline_kwargs(),
                )
                elapsed = time.perf_counter() - clock
                self.stats.record_call(started, time.time(), len(indices))
                spent[0] += elapsed
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
                for half in (indices[:middle], indices[middle:]):
                    self._generate_split(half, prompts, negatives, seeds, results, settings, spent)
                return
            reason = f"{type(exc).__name__}: {exc}".strip()
            results[indices[0]] = ImageGenerationError(reason[:2000])
            return
        non_finite = []
        for position, index in enumerate(indices):
            if images.finite[position]:
                results[index] = images.pixels[position]
            else:
                non_finite.append(index)
        if len(indices) > 1:
            # NaN latents can come from the batch (an fp16 overflow, say): retry each alone.
            for index in non_finite:
                self._generate_split([index], prompts, negatives, seeds, results, settings, spent)
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
        generate_s = [0.0] * table.num_rows
        encode_s = [0.0] * table.num_rows
        spent = [0.0]
        settings = row_settings(table)
        outcomes = (
            self.generate(
                [prompts[i] for i in todo],
                [negatives[i] for i in todo],
                [seeds[i] for i in todo],
                [settings[i] for i in todo],
                spent,
            )
            if todo
            else []
        )
        with self.pipeline_lock:
            truncated = self.truncated_prompts(prompts)
        finished = time.time()
        # This batch's pipeline seconds (its successful calls, halves of a split batch
        # included; an attempt that raised is not counted), split evenly over its images.
        share = spent[0] / len(todo) if todo else 0.0
        made: list[int] = []
        for row, outcome in zip(todo, outcomes, strict=True):
            generated_at[row] = finished
            generate_s[row] = share
            if isinstance(outcome, ImageGenerationError):
                statuses[row] = STATUS_ERROR
                errors[row] = str(outcome)
            else:
                made.append(row)
        pixels = [outcome for outcome in outcomes if not isinstance(outcome, ImageGenerationError)]
        for row, encoded in zip(made, self.encoder.encode_all(pixels), strict=True):
            images[row], digests[row], sizes[row] = encoded.data, encoded.sha256, len(encoded.data)
            encode_s[row] = encoded.seconds
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
            Col.GENERATE_S: pa.array(generate_s, pa.float64()),
            Col.ENCODE_S: pa.array(encode_s, pa.float64()),
        }
        for name, values in extra.items():
            table = table.append_column(name, values)
        if self.collector is not None:
            import ray

            # Waited for (about a millisecond), so that the report of a job's last batch
            # has arrived before the driver collects them all.
            try:
                ray.get(self.collector.report.remote(self.stats.snapshot()))
            except ray.exceptions.RayError as exc:
                # The busy fraction is a report about the job, not the job: a lost
                # collector must not fail a batch whose images are made.
                logger.warning("generator statistics no longer reported: %s", exc)
                self.collector = None
        return table


def image_rows(table: pa.Table, constants: dict[str, Any], passthrough: list[str]) -> pa.Table:
    """Generated rows as `generate_images` yields them: `IMAGE_ROW_SCHEMA`'s columns (the
    spec's `constants` filled in; a Dataset row's ordinal, which numbers nothing, null),
    then the passthrough columns."""
    needed = [field.name for field in IMAGE_ROW_FIELDS if field.name not in constants]
    require_columns(table, [*needed, *passthrough], "image rows")
    count = table.num_rows
    columns: dict[str, Any] = {}
    for field in IMAGE_ROW_FIELDS:
        if field.name in table.column_names:
            columns[field.name] = table.column(field.name).cast(field.type)
        else:
            columns[field.name] = pa.array([constants[field.name]] * count, field.type)
    if table.column(Col.SOURCE).null_count:
        # Rows without a source are a Dataset's (the read stage names every file's rows).
        columns[Col.ORDINAL] = pc.if_else(
            pc.is_null(columns[Col.SOURCE]), pa.scalar(None, pa.int64()), columns[Col.ORDINAL]
        )
    schema = IMAGE_ROW_SCHEMA
    for name in passthrough:
        columns[name] = table.column(name)
        schema = schema.append(table.schema.field(name))
    return pa.table(columns, schema=schema)


class ImageRows:
    """Actor stage of `generate_images`: the generator (`generator_cls`, built with the
    other arguments), its rows shaped by `image_rows`."""

    def __init__(self, generator_cls: type[GenerateImages], spec: JobSpec, **generator_args: Any):
        self.constants = spec.spec_constants()
        self.passthrough = list(spec.input.passthrough_columns)
        # An actor whose constructor raises dies, and Ray Data ends the job with the
        # death's remote traceback and the raylet's retry notes on the console. Failing
        # the actor's first batch instead ends it (Ray Data retries no actor task that
        # raises) with one line: what the constructor raised. Ray Data would end the job
        # on that first death too (DataContext.max_consecutive_actor_init_deaths = 0).
        self.start_error: str | None = None
        try:
            self.generator: GenerateImages | None = generator_cls(spec=spec, **generator_args)
        except Exception as exc:
            logger.exception("the generator could not start")  # the traceback: worker log
            self.generator = None
            where = f"{socket.gethostname()}:{os.getpid()}"
            message = " ".join(str(exc).split()).rstrip(".")
            self.start_error = f"{where}: {type(exc).__name__}: {message}"

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.generator is None:
            raise GeneratorStartError(
                f"a generator actor could not start on {self.start_error}; fix what it "
                "names (`koala-batch validate SPEC` checks the model), then rerun the same spec"
            )
        return image_rows(self.generator(table), self.constants, self.passthrough)
