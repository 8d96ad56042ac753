"""The same training on 1 device, 2 devices in one process and 2 processes (jax.distributed over
localhost): same losses, same parameters, and checkpoints restore onto another device count."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import (
  REPO,
  WHOLE_BATCH,
  config_flags,
  enable_compile_cache,
  relative_error,
  restore_params,
  subprocess_env,
  tiny_config,
)

from pvt_jax.train import loop, metrics


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def compile_cache():
  return enable_compile_cache()


def history(workdir):
  records = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  final_eval = [r for r in records if "eval/top1" in r][-1]
  return np.array(losses), final_eval


def start_parallel_runs(command, root, compile_cache) -> dict:
  """The training `command` started in the background on 2 devices (workdir root/two_devices)
  and as 2 processes of one job (root/two_processes): name -> Popen."""
  port = free_port()
  launches = {
      "two_devices": (command + [f"--workdir={root / 'two_devices'}"], 2),
      **{f"process{i}": (command + [f"--workdir={root / 'two_processes'}",
                                    f"--coordinator_address=127.0.0.1:{port}",
                                    "--num_processes=2", f"--process_id={i}"], 1)
         for i in range(2)},
  }
  return {name: subprocess.Popen(argv, cwd=REPO, env=subprocess_env(compile_cache, devices),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for name, (argv, devices) in launches.items()}


def run_beside(procs: dict, run_here, timeout: int):
  """run_here() in this process while the background `procs` run, then their outputs: all are
  killed if anything fails, and each must have succeeded. (run_here's result, name -> (stdout,
  stderr))."""
  try:
    result = run_here()
    outputs = {name: proc.communicate(timeout=timeout) for name, proc in procs.items()}
  finally:
    for proc in procs.values():
      proc.kill()
  for name, proc in procs.items():
    assert proc.returncode == 0, f"{name}: {outputs[name][1][-3000:]}"
  return result, outputs


def test_one_device_two_devices_and_two_processes_agree(tiny_fashion_mnist, compile_cache,
                                                        tmp_path):
  command = [sys.executable, "-m", "pvt_jax.main", "--config=configs/b0.py:runlocal",
             f"--config.fashion_mnist_dir={tiny_fashion_mnist}", *config_flags(WHOLE_BATCH)]
  config = tiny_config(tiny_fashion_mnist, WHOLE_BATCH)
  procs = start_parallel_runs(command, tmp_path, compile_cache)

  def one_device():
    assert jax.device_count() == 1
    loop.train_and_evaluate(config, str(tmp_path / "one_device"))

  run_beside(procs, one_device, timeout=600)

  losses, final_eval = history(tmp_path / "one_device")
  params, step = restore_params(str(tmp_path / "one_device"), config)
  assert len(losses) == 3 and step == 3 and final_eval["eval/count"] == 50
  assert losses[-1] < losses[0]
  for run in ("two_devices", "two_processes"):
    other_losses, other_eval = history(tmp_path / run)
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5, err_msg=run)
    assert other_eval["eval/count"] == 50
    assert other_eval["eval/loss"] == pytest.approx(final_eval["eval/loss"], rel=1e-4)
    # Saved from a 2-device mesh, restored onto this process's single device.
    other_params, other_step = restore_params(str(tmp_path / run), config)
    assert other_step == 3
    assert relative_error(params, other_params) <= 1e-5, run
