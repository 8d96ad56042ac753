"""The launchers: a real two-process run on this machine, and the SLURM / TPU pod commands."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
STARTUP_S = 900  # two trainers importing, preparing data and compiling on 2 loaded cores


def free_port() -> int:
  """A port nothing listens on now (rather than one derived from the pid, which can collide)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(command, env=None, timeout=600):
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def fake_command(directory, name, body='printf "%s\\n" "$@" > "$0.args"'):
  """An executable `name` in `directory` that records its arguments one per line."""
  path = Path(directory) / name
  path.write_text(f"#!/usr/bin/env bash\n{body}\n")
  path.chmod(0o755)
  return path


def test_two_local_processes_train_as_one_job(tmp_path, tiny_fashion_mnist):
  """From a fresh tfds data dir, as on a new machine: both processes find it unprepared."""
  workdir, tfds_data_dir = tmp_path / "run", tmp_path / "tfds"
  result = run([str(LAUNCH / "local_multiprocess.sh"), "2", "configs/b0.py:runlocal",
                str(workdir), f"--config.fashion_mnist_dir={tiny_fashion_mnist}",
                f"--config.data_dir={tfds_data_dir}", "--config.num_train_steps=4",
                "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4",
                "--config.log_every_steps=2", "--config.progress_bar=False"],
               env={"PORT": str(free_port())})
  logs = {i: (workdir / f"process_{i}.log").read_text() for i in (0, 1)}
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  (final_eval,) = [r for r in records if "eval/top1" in r]
  assert final_eval["step"] == 4 and final_eval["eval/count"] == 50  # each test example once
  assert "step 4: eval" in logs[0] and "step 4: eval" not in logs[1]  # process 0 reports


def training_flags(tmp_path, fashion_mnist_dir):
  """A smoke-config run that trains until stopped, logging every step."""
  return ["--config=configs/b0.py:runlocal", f"--config.fashion_mnist_dir={fashion_mnist_dir}",
          f"--config.data_dir={tmp_path / 'tfds'}", "--config.num_train_steps=1000000",
          "--config.log_every_steps=1", "--config.eval_every_steps=1000000",
          "--config.checkpoint_every_steps=1000000", "--config.progress_bar=False"]


def wait_until_training(workdir: Path, processes) -> None:
  """Until process 0 has logged a train step (so every process is in the training loop)."""
  deadline = time.monotonic() + STARTUP_S
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().count("\n")):
    assert all(p.poll() is None for p in processes), "a process ended before training"
    assert time.monotonic() < deadline, "no train step logged"
    time.sleep(0.5)


def trainer_pids(launcher_pid: int) -> dict[int, int]:
  """{process_id: pid} of the trainers a launcher started (its children, from /proc)."""
  pids = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
    except OSError:  # exited meanwhile
      continue
    if int(fields[1]) == launcher_pid and b"pvt_jax.main" in cmdline:
      (process_id,) = [a for a in cmdline if a.startswith(b"--process_id=")]
      pids[int(process_id.split(b"=")[1])] = int(stat.parent.name)
  return pids


def alive(pid: int) -> bool:
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.slow
def test_local_launcher_stops_the_others_when_a_process_dies(tmp_path, tiny_fashion_mnist):
  workdir = tmp_path / "run"
  flags = training_flags(tmp_path, tiny_fashion_mnist)
  launcher = subprocess.Popen(
      [str(LAUNCH / "local_multiprocess.sh"), "2", flags[0].split("=", 1)[1], str(workdir),
       *flags[1:]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHONPATH": str(ROOT), "PORT": str(free_port()), "GRACE_S": "10"})
  try:
    wait_until_training(workdir, [launcher])
    pids = trainer_pids(launcher.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    elapsed = time.monotonic() - killed
  finally:
    launcher.kill()
  assert launcher.returncode == 128 + signal.SIGKILL, stderr
  assert "error: process 1 exited with status 137" in stderr
  assert not alive(pids[0])  # the survivor did not outlive the launcher
  assert elapsed < 10 + 5, elapsed  # well within the SIGTERM grace period and the SIGKILL


@pytest.mark.slow
def test_a_survivor_of_a_dead_peer_exits_in_one_line_within_the_timeout(tmp_path,
                                                                         tiny_fashion_mnist):
  """Started directly (no launcher to stop it), the other process ends on its own, with one
  `error:` line, no traceback and no JAX abort, well before --distributed_timeout_s."""
  workdir, port = tmp_path / "run", free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  processes = [subprocess.Popen(
      [sys.executable, "-m", "pvt_jax.main", *training_flags(tmp_path, tiny_fashion_mnist),
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", "--distributed_timeout_s=20"], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  try:
    wait_until_training(workdir, processes)
    processes[1].kill()
    killed = time.monotonic()
    _, stderr = processes[0].communicate(timeout=120)
    elapsed = time.monotonic() - killed
  finally:
    for process in processes:
      process.kill()
  assert processes[0].returncode == 1, stderr[-3000:]
  (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert line.startswith("error: process 0 of 2: another process stopped (Gloo"), line
  assert "Traceback" not in stderr and "Fatal Python error" not in stderr
  assert elapsed < 20, elapsed


def test_local_launcher_fails_with_the_first_failing_process(tmp_path):
  result = run([str(LAUNCH / "local_multiprocess.sh"), "2", "configs/b0.py:runlocal",
                str(tmp_path), "--config.no_such_field=1"], timeout=300)
  assert result.returncode != 0
  assert re.search(r"error: process [01] exited with status 1", result.stderr)
  assert "no_such_field" in result.stderr  # the failing process's own error, from its log


def test_local_launcher_explains_its_usage():
  result = run([str(LAUNCH / "local_multiprocess.sh")])
  assert result.returncode == 2 and "Usage: launch/local_multiprocess.sh N CONFIG" in result.stderr


def test_tpu_pod_runs_one_command_on_all_workers(tmp_path):
  gcloud = fake_command(tmp_path, "gcloud", 'printf "%s\\n" "$@" >> "$0.args"')
  result = run([str(LAUNCH / "tpu_pod.sh"), "configs/b2.py:imagenet", "gs://b/runs/b2",
                "--config.batch_size=4096", "--config.aug.randaugment=rand-m9 mstd0.5"],
               env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU": "pod", "ZONE": "z1",
                    "PROJECT": "p"})
  assert result.returncode == 0, result.stderr
  args = Path(f"{gcloud}.args").read_text().splitlines()
  assert args[:7] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z1", "--project=p"]
  assert "--worker=all" in args
  (command,) = [a[len("--command="):] for a in args if a.startswith("--command=")]
  # What each worker's shell runs: cd into the clone, then the trainer with the flags intact.
  python3 = fake_command(tmp_path, "python3")
  (tmp_path / "pvt_jax").mkdir()
  worker = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(tmp_path),
                               "PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert worker.returncode == 0, worker.stderr
  assert Path(f"{python3}.args").read_text().splitlines() == [
      "-m", "pvt_jax.main", "--distributed", "--config=configs/b2.py:imagenet",
      "--workdir=gs://b/runs/b2", "--config.batch_size=4096",
      "--config.aug.randaugment=rand-m9 mstd0.5"]


def test_tpu_pod_setup_installs_on_every_worker_first(tmp_path):
  gcloud = fake_command(tmp_path, "gcloud", 'echo "$*" >> "$0.args"')
  result = run([str(LAUNCH / "tpu_pod.sh"), "configs/b0.py", "gs://b/r"],
               env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU": "pod", "ZONE": "z",
                    "SETUP": "1"})
  assert result.returncode == 0, result.stderr
  setup, train = Path(f"{gcloud}.args").read_text().splitlines()
  assert "--worker=all" in setup and "git clone" in setup and "jax[tpu]" in setup
  assert "pvt_jax.main" in train


@pytest.mark.parametrize("missing", ["TPU", "ZONE"])
def test_tpu_pod_requires_the_tpu_name_and_zone(missing):
  env = {"TPU": "pod", "ZONE": "z"}
  del env[missing]
  result = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "configs/b0.py", "gs://b/r"], cwd=ROOT,
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ("TPU", "ZONE")}
                          | env)
  assert result.returncode != 0 and missing in result.stderr


def test_slurm_script_starts_one_trainer_per_gpu(tmp_path):
  script = (LAUNCH / "slurm.sbatch").read_text()
  directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, re.M))
  # jax.distributed takes SLURM_LOCALID as the task's GPU: one task per GPU, all GPUs visible.
  assert directives["ntasks-per-node"] == directives["gpus-per-node"]
  assert "gpus-per-task" not in directives
  srun = fake_command(tmp_path, "srun")
  result = run(["bash", str(LAUNCH / "slurm.sbatch"), "configs/b2.py:imagenet", "/shared/b2",
                "--config.batch_size=2048"], env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  args = Path(f"{srun}.args").read_text().splitlines()
  trainer = args[args.index("python"):]
  assert trainer == ["python", "-m", "pvt_jax.main", "--config=configs/b2.py:imagenet",
                     "--workdir=/shared/b2", "--config.batch_size=2048"]
