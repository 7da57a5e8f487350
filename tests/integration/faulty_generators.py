"""Generator stages with injected faults, for fault-tolerance tests.

Each factory returns a subclass of the real GenerateImages defined inside a function, so
cloudpickle ships it to Ray workers by value. The real pipeline still does the work;
only the named faults are added.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from koala_batch.stages.generate import GenerateImages

OOM_PROMPT = "oom-when-batched"
FAILING_PROMPT = "always-fails"
NAN_PROMPT = "nan-latents"
KILL_PROMPT = "kill-the-actor"


def fault_injecting_generator(calls_dir: Path) -> type[GenerateImages]:
    """Out of memory for any batch > 1 holding OOM_PROMPT, an error for FAILING_PROMPT,
    NaN latents for NAN_PROMPT. Every pipeline call's prompts are logged to calls_dir."""
    calls_dir = str(calls_dir)

    class FaultInjectingGenerator(GenerateImages):
        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            import torch

            log = Path(calls_dir) / f"{os.getpid()}.log"
            with log.open("a") as handle:
                handle.write(json.dumps(prompts) + "\n")
            if len(prompts) > 1 and OOM_PROMPT in prompts:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if FAILING_PROMPT in prompts:
                raise RuntimeError("injected failure for this prompt")
            poisoned = [i for i, prompt in enumerate(prompts) if prompt == NAN_PROMPT]
            if not poisoned:
                return super().run_pipeline(prompts, negative_prompts, seeds, **pipeline_kwargs)

            def nan_latents(pipeline, step, timestep, callback_kwargs):
                latents = callback_kwargs["latents"]
                latents[poisoned] = float("nan")
                return {"latents": latents}

            return super().run_pipeline(
                prompts,
                negative_prompts,
                seeds,
                callback_on_step_end=nan_latents,
                callback_on_step_end_tensor_inputs=["latents"],
            )

    return FaultInjectingGenerator


def self_killing_generator(marker: Path) -> type[GenerateImages]:
    """SIGKILLs its own process the first time a batch holds KILL_PROMPT (once per marker)."""
    marker = str(marker)

    class SelfKillingGenerator(GenerateImages):
        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            if KILL_PROMPT in prompts and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().run_pipeline(prompts, negative_prompts, seeds, **pipeline_kwargs)

    return SelfKillingGenerator
