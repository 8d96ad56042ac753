"""The benchmark CLI end to end (quick mode) and its measuring helpers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvt_jax import benchmark
from pvt_jax.models import dispatch, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "pvt_jax.benchmark", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  proc = _cli("--quick", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out / "results.json") as f:
    return out, json.load(f), proc.stdout


def test_quick_run_times_both_frameworks_alternately(quick_run):
  _, results, _ = quick_run
  (row,) = results["variants"]
  assert (row["variant"], row["resolution"], row["batch_size"]) == ("b0", 32, 2)
  for name in ("jax_inference", "jax_train", "torch_inference", "torch_train"):
    t = row["timings"][name]
    assert len(t["seconds"]) == 2 and all(s > 0 for s in t["seconds"])
    assert t["min_s"] <= t["median_s"] <= t["max_s"]
    assert t["img_per_s"] == pytest.approx(2 / t["median_s"])
  for mode in ("inference", "train"):
    ratio = row[f"{mode}_speedup"]["ratio_of_medians"]
    want = row["timings"][f"torch_{mode}"]["median_s"] / row["timings"][f"jax_{mode}"]["median_s"]
    assert ratio == pytest.approx(want)


def test_quick_run_reports_compile_memory_and_flops(quick_run):
  _, results, _ = quick_run
  row = results["variants"][0]
  assert row["jax_compile_s"]["inference"] > 0 and row["jax_compile_s"]["train"] > 0
  # Training keeps activations for the backward pass: more memory than inference.
  assert row["jax_memory"]["train"]["peak_bytes"] > row["jax_memory"]["inference"]["peak_bytes"]
  assert row["torch_memory"]["train_peak_growth_bytes"] >= 0
  assert row["torch_memory"]["measure"] == "peak RSS"  # timm ran on the CPU, as JAX did
  assert results["environment"]["torch_device"] == "cpu"
  flops = row["flops"]
  # The paper's 0.57 GMACs at 224 px, scaled to 32 px; XLA also counts norms and softmax.
  assert flops["paper_gflops_per_image"] == pytest.approx(2 * 0.57 * 32**2 / 224**2)
  assert 0.8 < flops["xla_inference_gflops_per_image"] / flops["paper_gflops_per_image"] < 2.5
  assert 2 < flops["xla_train_gflops_per_image"] / flops["xla_inference_gflops_per_image"] < 5
  by_library = results["matmul_peak"]["gflops_per_s_by_library"]
  assert set(by_library) == {"xla", "xla_inference", "torch"}
  assert results["matmul_peak"]["gflops_per_s"] == max(by_library.values()) > 0
  assert results["matmul_peak"]["dtype"] == "float32"
  peak = results["matmul_peak"]["gflops_per_s"] * 1e9
  for mode in ("inference", "train"):
    flops_per_call = flops[f"xla_{mode}_gflops_per_image"] * 1e9 * row["batch_size"]
    jax_s = row["timings"][f"jax_{mode}"]["median_s"]
    assert flops[f"achieved_{mode}_gflops_per_s"] == pytest.approx(flops_per_call / jax_s / 1e9)
    torch_s = row["timings"][f"torch_{mode}"]["median_s"]
    assert flops["speedup_bound_at_matmul_peak"][mode] == pytest.approx(
        torch_s / (flops_per_call / peak))
  # The CLI re-executes itself under tcmalloc (CI installs it), for both frameworks alike.
  assert results["environment"]["allocator"] == "tcmalloc"
  assert results["environment"]["cpu_kernels"] is True  # CI installs a C++ compiler


def test_quick_run_writes_table_plot_and_sweep(quick_run):
  out, results, stdout = quick_run
  table = (out / "results.md").read_text()
  assert "python -m pvt_jax.benchmark --quick" in table
  assert "| b0 | 32 | 2 | float32 |" in table
  assert table in stdout
  assert (out / "benchmark.png").stat().st_size > 1000
  rows = results["sweep"]["b0"]["rows"]
  assert [r["resolution"] for r in rows] == [32, 64]
  assert rows[1]["gflops"] > rows[0]["gflops"]


def test_bad_variant_is_a_one_line_error(tmp_path):
  proc = _cli("--variants=b9", f"--output_dir={tmp_path}", timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: unknown variant 'b9'; choose from b0, b1, b2, b2_li, b3, b4, b5")
  assert "Traceback" not in proc.stderr


def test_line_fit_tells_linear_from_quadratic_growth():
  px = [224**2, 512**2, 1024**2]
  linear = benchmark._line_fit([{"pixels": p, "y": 3e-6 * p + 0.5} for p in px], "y")
  assert linear["r2"] == pytest.approx(1.0)
  assert linear["slope"] == pytest.approx(3e-6)
  quadratic = benchmark._line_fit([{"pixels": p, "y": 1e-12 * p * p} for p in px], "y")
  assert quadratic["per_pixel_growth"] == pytest.approx(1024**2 / 224**2)


def test_time_interleaved_alternates_calls():
  calls = []
  times = benchmark.time_interleaved({"a": lambda: calls.append("a"),
                                      "b": lambda: calls.append("b")}, repeats=3)
  assert calls == ["a", "b"] * 4  # one warmup round, then three timed rounds
  assert [len(t) for t in times.values()] == [3, 3]


def test_spread_reports_median_and_quartiles():
  s = benchmark.spread([4.0, 1.0, 2.0, 3.0, 5.0], images=10)
  assert (s["median_s"], s["q1_s"], s["q3_s"], s["min_s"], s["max_s"]) == (3, 2, 4, 1, 5)
  np.testing.assert_allclose(s["img_per_s_iqr"], [10 / 4, 10 / 2])


def test_input_pipeline_hook_measures_data_throughput(tiny_fashion_mnist):
  s = benchmark.Settings(("b0",), 32, 4, "float32", 1, False, (), (), 1, 1, 64, 2,
                         tiny_fashion_mnist)
  result = benchmark.input_pipeline(s)
  assert result["ok"], result
  assert result["img_per_s"] > 0


def test_timm_runs_where_jax_runs_or_the_benchmark_refuses(monkeypatch):
  import torch
  assert benchmark.torch_device() == "cpu"
  monkeypatch.setattr(benchmark.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
  with pytest.raises(benchmark.BenchmarkError, match="JAX runs on gpu but PyTorch has no device"):
    benchmark.torch_device()
  monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
  assert benchmark.torch_device() == "cuda"


def test_matmul_peak_times_xla_once_where_inference_needs_no_options(monkeypatch):
  monkeypatch.setattr(benchmark, "inference_compiler_options", lambda: {})
  peak = benchmark.measure_matmul_peak(64, repeats=1)
  assert set(peak["gflops_per_s_by_library"]) == {"xla", "torch"}


def test_bfloat16_peak_and_timm_autocast_step():
  peak = benchmark.measure_matmul_peak(64, "bfloat16", "cpu", repeats=1)
  assert peak["dtype"] == "bfloat16" and min(peak["gflops_per_s_by_library"].values()) > 0
  model = benchmark.TorchModel("b0", 1, 32, 32, "bfloat16")
  before = [p.detach().clone() for p in model.module.parameters()]
  model.train_step()
  assert any(not b.equal(p) for b, p in zip(before, model.module.parameters(), strict=True))
  model.infer()


def test_flop_counts_see_through_the_cpu_kernels():
  """XLA counts an FFI call as no FLOPs; xla_flops counts the same math in XLA's plain forms."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 64, 1, 32)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((2, 49, 2, 1, 32)), jnp.float32)
  in_kernel = jax.jit(dispatch.attention).lower(q, kv).compile()
  assert in_kernel.cost_analysis().get("flops", 0.0) < 1e3  # the kernel is opaque to XLA
  plain = jax.jit(ops.attention).lower(q, kv).compile().cost_analysis()["flops"]
  assert plain >= 2 * 2 * 64 * 49 * 32 * 2  # two products of 2*N*M*D FLOPs per image
  assert benchmark.xla_flops(dispatch.attention, q, kv) == pytest.approx(plain, rel=0.01)


def test_flop_count_of_the_depthwise_weight_gradient_is_its_work():
  """The depthwise conv's kernel gradient is one multiply-add per input element and tap, as its
  forward pass; XLA:CPU's compiled form of it (a dense C x C convolution) does C times that."""
  b, h, w, c = 2, 8, 8, 64
  x = jnp.ones((b, h, w, c))
  kernel, bias = jnp.ones((3, 3, 1, c)), jnp.zeros((c,))
  def kernel_grad(x, kernel, bias):
    return jax.grad(lambda k: ops.depthwise_conv3x3(x, k, bias).sum())(kernel)
  taps = 2 * 9 * b * h * w * c
  assert 0.8 * taps < benchmark.xla_flops(kernel_grad, x, kernel, bias) < 1.2 * taps
  compiled = jax.jit(kernel_grad).lower(x, kernel, bias).compile().cost_analysis()
  compiled = compiled[0] if isinstance(compiled, list) else compiled
  assert compiled["flops"] > c / 2 * taps  # what the compiled count would have said




@pytest.mark.slow
def test_remat_memory_rows(monkeypatch):
  """`--remat_memory`'s rows (here on B0 at 32 px): remat keeps less for the backward pass."""
  monkeypatch.setattr(benchmark, "REMAT_CASES", (("b0", 32),))
  s = benchmark.Settings(("b0",), 32, 2, "float32", 1, False, (), (), 1, 1, 64, 0, "",
                         remat_memory=True)
  plain, full = benchmark.remat_memory(s)
  assert (plain["remat_policy"], full["remat_policy"]) == ("none", "full")
  assert full["residual_bytes"] < 0.3 * plain["residual_bytes"]
  assert plain["train_compile_s"] > 0 and full["xla_memory"]["peak_bytes"] > 0
  assert "| b0 | 32 | 2 | full |" in "\n".join(benchmark.remat_markdown([plain, full]))
