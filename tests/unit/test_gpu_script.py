"""bench/gpu.py without a GPU: its arithmetic, arguments, budget and wheel choice, and that
its imports, the generator path's included, need neither Ray nor s3fs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import common, gpu

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_flop_bounds_match_the_issue():
    """KOALA-700M, 25 steps with guidance: 25 x 2 x 2.70 + 10.5 TFLOP, 0.147 s on an H100;
    Lightning-700M, 10 steps: 0.065 s."""
    koala = gpu.image_tflop("koala-700m", 25, 5.0, 1024, 1024)
    lightning = gpu.image_tflop("koala-lightning-700m", 10, 3.5, 1024, 1024)
    assert koala == pytest.approx(25 * 2 * 2.70 + 10.5)
    assert koala / 989 == pytest.approx(0.147, abs=5e-4)
    assert lightning / 989 == pytest.approx(0.065, abs=5e-4)
    assert gpu.image_tflop("koala-1b", 25, 5.0, 1024, 1024) == pytest.approx(25 * 2 * 3.43 + 10.5)
    # No guidance: one latent per step. Half the side: a quarter of the work.
    assert gpu.image_tflop("koala-700m", 4, 1.0, 1024, 1024) == pytest.approx(4 * 2.70 + 10.5)
    assert gpu.image_tflop("koala-700m", 25, 5.0, 512, 512) == pytest.approx(koala / 4)
    assert gpu.image_tflop("cpu", 2, 5.0, 64, 64) is None


def test_peaks_by_device_name():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert gpu.peak_tflops("NVIDIA H200") == (989.0, "H200")
    assert gpu.peak_tflops("AMD EPYC x2 cores") == (None, None)


def test_targets_apply_at_1024_with_the_presets_steps():
    assert gpu.target_s_per_image("koala-700m", 25, 1024, 1024) == 0.30
    assert gpu.target_s_per_image("koala-lightning-700m", 10, 1024, 1024) == 0.12
    assert gpu.target_s_per_image("koala-700m", 25, 512, 512) is None
    assert gpu.target_s_per_image("koala-700m", 10, 1024, 1024) is None


def test_flop_columns():
    columns = gpu.flop_columns(0.5, 145.5, 989.0)
    assert columns["achieved_tflops"] == pytest.approx(291.0)
    assert columns["fraction_of_peak"] == pytest.approx(291.0 / 989.0)
    assert columns["bound_s_per_image"] == pytest.approx(145.5 / 989.0)
    # An unknown device: TFLOP/s only.
    unknown = gpu.flop_columns(0.5, 145.5, None)
    assert unknown["achieved_tflops"] == pytest.approx(291.0)
    assert unknown["fraction_of_peak"] is None and unknown["bound_s_per_image"] is None
    assert gpu.flop_columns(None, None, 989.0)["achieved_tflops"] is None


def test_arguments_gpu_and_dry_run_defaults(tmp_path):
    args = gpu.parse_args(["--out", str(tmp_path)])
    assert (args.size, args.images, args.batch, args.sweep) == (1024, 16, 4, [1, 2, 4, 8])
    assert args.cases == ["koala-700m", "koala-lightning-700m"] and args.arch is None
    assert args.compile_modes == ["default"] and args.budget_s == 420
    dry = gpu.parse_args(["--out", str(tmp_path), "--dry-run"])
    assert (dry.arch, dry.size, dry.steps, dry.images, dry.threads) == ("cpu", 64, 2, 2, 1)
    assert dry.compile_modes == []
    # --batch is always among the sweep's sizes: compile is compared with it.
    assert gpu.parse_args(["--out", "x", "--batch", "3", "--sweep", "1,8"]).sweep == [1, 3, 8]
    assert gpu.parse_args(["--out", "x", "--compile-modes", ""]).compile_modes == []


@pytest.mark.parametrize("argv", [["--cases", "koala-9b"], ["--images", "0"], ["--sweep", "0"], []])
def test_arguments_refused(argv, capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(argv if not argv else ["--out", "x", *argv])


def test_wheels_installed_only_where_missing_or_older(tmp_path):
    pytest_version = gpu.installed_version("pytest")
    newer = tmp_path / "pytest-999.0-py3-none-any.whl"
    same = tmp_path / f"pytest-{pytest_version}-py3-none-any.whl"
    absent = tmp_path / "no_such_dist-1.0-py3-none-any.whl"
    assert gpu.wheels_to_install([newer, same, absent]) == [newer, absent]
    assert gpu.wheel_name_version(absent) == ("no-such-dist", "1.0")
    assert gpu.version_key("2.13.0+cpu") == (2, 13, 0) < gpu.version_key("2.13.1")


def test_no_wheels_exits_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "missing_modules", lambda names: ["diffusers"])
    with pytest.raises(SystemExit, match="make gpu-wheels"):
        gpu.bootstrap(tmp_path)


def test_nothing_installed_where_diffusers_and_pydantic_import(tmp_path):
    assert gpu.bootstrap(tmp_path)["needed"] is False


def _bench(tmp_path, budget_s: float, peak: float | None = 989.0) -> gpu.Bench:
    args = gpu.parse_args(["--out", str(tmp_path)])
    report = gpu.Report(
        path=tmp_path / "gpu-test.json",
        summary_path=tmp_path / "summary.md",
        environment={"device": "NVIDIA H100 80GB HBM3"},
        settings={
            "width": 1024,
            "height": 1024,
            "images": 16,
            "image_format": "png",
            "concurrency_b": 2,
            "peak_tflops": peak,
            "peak_matched": "H100",
            "budget_s": budget_s,
        },
    )
    return gpu.Bench(args=args, report=report, peak=peak, deadline=time.monotonic() + budget_s)


def test_budget_skips_and_failures_are_recorded_and_saved(tmp_path):
    bench = _bench(tmp_path, budget_s=60)
    assert bench.attempt("fits", 1.0, lambda: 42) == 42
    assert bench.attempt("too long", 600.0, lambda: pytest.fail("must not run")) is None

    def broken():
        raise RuntimeError("CUDA out of memory")

    assert bench.attempt("broken", None, broken) is None
    document = json.loads(bench.report.path.read_text())
    results = document["results"]
    assert [item["measurement"] for item in results["skipped"]] == ["too long"]
    assert results["errors"] == [
        {"measurement": "broken", "error": "RuntimeError: CUDA out of memory"}
    ]
    assert [item["outcome"] for item in results["timeline"]] == ["ok", "error"]
    summary = bench.report.summary_path.read_text()
    assert "skipped too long" in summary and "failed broken" in summary


def test_sweep_trimmed_to_the_budget_keeping_the_main_batch(tmp_path):
    case = gpu.Case("koala-700m", "koala-700m", 25, 5.0)
    sampler = gpu.case_sampler(case, 1024)
    bench = _bench(tmp_path, budget_s=1000)
    bench.s_per_image[case.name] = 0.3
    bench.load_s = 10.0
    assert gpu.fit_sweep(bench, case, sampler) == [1, 2, 4, 8]
    # 10 s load + (1 + 16) + (2 + 16) + (4 + 16) images at 0.3 s: 26.5 s; with 8: 33.7 s.
    bench.deadline = time.monotonic() + 30
    assert gpu.fit_sweep(bench, case, sampler) == [1, 2, 4]
    bench.deadline = time.monotonic() + 17  # batch 4 alone: 10 + 20 x 0.3 = 16 s
    assert gpu.fit_sweep(bench, case, sampler) == [4]
    bench.deadline = time.monotonic() + 5
    assert gpu.fit_sweep(bench, case, sampler) == []


def test_rows_get_flop_and_target_columns(tmp_path):
    bench = _bench(tmp_path, budget_s=60)
    case = gpu.Case("koala-700m", "koala-700m", 25, 5.0)
    row = {"variant": "b", "batch": 4, "s_per_image": 0.291, "images_per_s": 1 / 0.291}
    bench.annotate(row, case, gpu.case_sampler(case, 1024))
    assert row["bound_s_per_image"] == pytest.approx(0.147, abs=5e-4)
    assert row["achieved_tflops"] == pytest.approx(145.5 / 0.291)
    assert row["meets_target"] is True and row["target_s_per_image"] == 0.30
    bench.report.save()
    assert "| koala-700m | b | 4 |" in bench.report.summary_path.read_text()


# Ray and s3fs made unimportable, as on a GPU machine without them: the script's imports,
# the generator path's modules and a (b) job spec must all work, and neither be imported.
NO_RAY = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "s3fs"):
                raise ImportError(f"{name} is refused in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    from pathlib import Path

    from bench import gpu
    import bench.architectures, koala_batch.spec, koala_batch.stages.encode
    import koala_batch.stages.generate, koala_batch.models.loading
    from koala_batch.stages.generate import GenerateImages

    args = gpu.parse_args(["--out", "unused", "--dry-run"])
    assert gpu.bootstrap(args.wheels)["needed"] is False
    (case, _) = gpu.case_list(args)
    sampler = gpu.case_sampler(case, args.size)
    spec = gpu.stage_spec(args, Path("model"), sampler, args.batch, "default")
    assert spec.compute.compile and spec.generation.steps == 2
    gpu.generator.counting_stage_class()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "s3fs"))
    assert not loaded, loaded
    print("no ray")
    """
)


def test_script_imports_need_neither_ray_nor_s3fs():
    result = subprocess.run(
        [sys.executable, "-c", NO_RAY],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("no ray")


def test_runs_as_a_file_from_anywhere(tmp_path):
    """`python3 bench/gpu.py` puts bench/, not the repo root, on sys.path."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--dry-run" in result.stdout and "--budget-s" in result.stdout


def test_bench_common_architectures_cover_the_flop_model():
    assert set(gpu.UNET_TFLOP_AT_128) <= set(common.REAL_ARCHITECTURES)
    assert set(gpu.DEFAULT_CASES) <= set(gpu.UNET_TFLOP_AT_128)


def test_measure_chooses_what_runs(tmp_path):
    assert gpu.parse_args(["--out", "x"]).measure == list(gpu.MEASUREMENTS)
    only = gpu.parse_args(["--out", "x", "--measure", "breakdown"])
    assert only.measure == ["breakdown"] and only.compile_modes == []
    with pytest.raises(SystemExit):
        gpu.parse_args(["--out", "x", "--measure", "profile"])


def test_breakdown_parts_add_up_to_the_call(model_cache, tmp_path, one_thread):
    from bench import generator
    from koala_batch.spec import spec_from_dict
    from tests.conftest import tiny_spec

    spec = spec_from_dict(tiny_spec("in.parquet", str(tmp_path / "out")))
    work = common.work_rows(spec, common.prompt_table(4))
    result = generator.component_breakdown(spec, work, batch_size=2, threads=1, warmup=1)
    parts = result["parts_s_per_image"]
    steps = spec.generation.steps
    # Two calls of two images: each call one VAE decode and a U-Net forward per step
    # (guidance's two latents go through in one forward).
    assert result["calls"]["call"] == 2 and result["calls"]["vae_decode"] == 2
    assert result["calls"]["unet"] == 2 * steps
    assert all(parts[name] > 0 for name in ("text_encoder", "text_encoder_2", "unet", "vae_decode"))
    # The rest is what the timed parts leave of the call: never negative, as it would be
    # if a part were counted twice.
    assert 0 <= parts["other"] < result["s_per_image"]
    assert sum(parts.values()) == pytest.approx(result["s_per_image"])


def test_decode_comparison_gives_diffusers_bytes_in_float32(one_thread):
    # The tiny model's VAE on the CPU (float32): koala-batch's decode must give exactly the
    # bytes of the pipeline's own decode and image processor, which it stands in for.
    args = gpu.parse_args(["--out", "unused", "--dry-run", "--batch", "2"])
    result = gpu.decode_comparison(args)
    assert result["decode_dtype"] == "float32" and result["batch"] == 2
    assert result["identical_bytes_fraction"] == 1.0
    assert result["koala_batch_s_per_image"] > 0 and result["diffusers_s_per_image"] > 0
