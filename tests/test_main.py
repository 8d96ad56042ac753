"""The CLIs (pvt_jax.main, pvt_jax.evaluate): --help, one-line errors with exit code 1 and no
traceback, NaN handling, and evaluation of training and converted checkpoints.

The pvt_jax.main cases share ONE subprocess with 2 CPU devices (importing jax + TF costs ~10 s
per process): a driver calls the entry point once per case, as `python -m` would after import,
and reports exit code, stdout and stderr per case.
"""

import json
import os
import re
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
  restore_params,
  subprocess_env,
  tiny_config,
)

from pvt_jax.checkpoints import save_converted
from pvt_jax.models import VARIANTS, create_model
from pvt_jax.train import checkpointing, metrics

DRIVER = """
import contextlib, io, json, sys
from absl import flags
from pvt_jax import main
results = {}
for case, argv in json.loads(sys.argv[1]):
  out, err = io.StringIO(), io.StringIO()
  flags.FLAGS.unparse_flags()
  for flag in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, flag)  # config_flags defines one flag per field at each parse
  sys.argv = ["main"] + argv
  code = None
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      main.run()
    except SystemExit as e:
      code = 0 if e.code is None else e.code
  results[case] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print("RESULTS " + json.dumps(results), file=sys.__stdout__)
"""


def on_a_small_disk(argv) -> list[str]:
  """`argv` run where no file over 1 MB can be written (EFBIG, as ENOSPC on a full disk);
  SIGXFSZ ignored, so that the write fails instead of killing the process."""
  return ["bash", "-c", "ulimit -f 1024 && trap '' XFSZ && exec \"$@\"", "bash", *argv]


def read_only_directory(path) -> bool:
  """A directory nobody can write into, even root (a read-only tmpfs); False if impossible."""
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    return True
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                         capture_output=True)
  return mount.returncode == 0


@pytest.fixture(scope="module")
def cli(tiny_fashion_mnist, tmp_path_factory):
  """Runs every CLI case; returns (exit code, stdout, stderr by case name, paths)."""
  cache = enable_compile_cache()
  root = tmp_path_factory.mktemp("cli")
  converted = str(root / "converted")
  params = create_model("b0", num_classes=10).init(jax.random.key(3),
                                                   np.zeros((1, 64, 64, 3)))["params"]
  save_converted(converted, params, {"variant": "b0", "num_classes": 10, "source_file": "x.pth",
                                     "source_sha256": "0", "source_format": "official"})
  data_flag = f"--config.fashion_mnist_dir={tiny_fashion_mnist}"
  tiny = ["--config=configs/b0.py:runlocal", data_flag]
  run, nan = str(root / "run"), str(root / "nan")
  # Cases that must fail before the dataset is opened point tfds at a directory that must stay
  # absent (preparing the dataset would create it).
  untouched = ["--config=configs/b0.py:runlocal", data_flag,
               f"--config.data_dir={root / 'untouched'}", f"--workdir={root / 'x'}"]
  (root / "file").write_text("not a directory")
  read_only = read_only_directory(root / "read_only")
  whole_batch = config_flags(WHOLE_BATCH)
  eval_flags = ["--dataset=fashion_mnist", f"--fashion_mnist_dir={tiny_fashion_mnist}",
                "--image_size=64", "--batch_size=16"]
  cases = [
      ("zero_batch", untouched + ["--config.batch_size=0"]),
      ("negative_batch", untouched + ["--config.batch_size=-8"]),
      ("negative_lr", untouched + ["--config.optimizer.base_lr=-0.001"]),
      ("overflowing_lr", untouched + ["--config.optimizer.base_lr=1e41"]),
      ("unknown_variant", untouched + ["--config.variant=b9"]),
      ("missing_init_from", untouched + [f"--config.init_from={root / 'nonexistent'}"]),
      ("finetune_without_init_from", ["--config=configs/finetune.py:b0", *untouched[1:]]),
      ("workdir_is_a_file", untouched[:3] + [f"--workdir={root / 'file'}"]),
      ("workdir_under_a_file", untouched[:3] + [f"--workdir={root / 'file' / 'run'}"]),
      ("read_only_workdir", untouched[:3] + [f"--workdir={root / 'read_only'}"]),
      ("typo", untouched + ["--config.batch_sise=1"]),
      ("missing_config_file", ["--config=configs/b9.py", f"--workdir={root / 'x'}"]),
      ("unknown_field", tiny + [f"--workdir={root / 'x'}", "--config.nosuch=1"]),
      ("unknown_nested_field", tiny + [f"--workdir={root / 'x'}", "--config.aug.nosuch=1"]),
      ("unknown_mode", ["--config=configs/b0.py:fast", f"--workdir={root / 'x'}"]),
      ("indivisible_batch", tiny + [f"--workdir={root / 'x'}", "--config.batch_size=3"]),
      ("unknown_dataset", tiny + [f"--workdir={root / 'x'}", "--config.dataset=no_such_dataset"]),
      ("bad_init_from", tiny + [f"--workdir={root / 'x'}",
                                f"--config.init_from={root / 'missing'}"]),
      ("nan", tiny + [f"--workdir={nan}", *config_flags(
          {**WHOLE_BATCH, "num_train_steps": 6, "checkpoint_every_steps": 1,
           "optimizer.base_lr": 1e30})]),
      ("train", tiny + [f"--workdir={run}", *whole_batch]),
      ("train_again", tiny + [f"--workdir={run}", *whole_batch]),
      ("other_config", tiny + [f"--workdir={run}", *whole_batch, "--config.variant=b1",
                               "--config.image_size=32",
                               f"--config.data_dir={root / 'untouched'}"]),
  ]
  evaluations = {
      "evaluate_workdir": [f"--checkpoint={run}"],
      "evaluate_converted": [f"--checkpoint={converted}", *eval_flags],
      "evaluate_missing": [f"--checkpoint={root / 'missing'}", *eval_flags],
  }
  # --help needs the real `python -m` (absl prints the __main__ module's docstring and flags).
  help_proc = subprocess.Popen([sys.executable, "-m", "pvt_jax.main", "--help"], cwd=REPO,
                               env=subprocess_env(cache), stdout=subprocess.PIPE, text=True)
  try:
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=REPO,
                          env=subprocess_env(cache, devices=2), capture_output=True, text=True,
                          timeout=900)
  finally:
    if read_only and os.geteuid() == 0:
      subprocess.run(["umount", str(root / "read_only")], check=True)
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
  assert proc.returncode == 0 and line, proc.stderr[-3000:]
  results = json.loads(line[0][len("RESULTS "):])
  results["help"] = {"stdout": help_proc.communicate(timeout=300)[0]}
  # A failed save ends the process at once (os._exit), so that case has its own process.
  evaluate_procs = {
      case: subprocess.Popen([sys.executable, "-m", "pvt_jax.evaluate", *argv], cwd=REPO,
                             env=subprocess_env(cache, devices=2), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
      for case, argv in evaluations.items()}
  evaluate_procs["full_disk"] = subprocess.Popen(
      on_a_small_disk([sys.executable, "-m", "pvt_jax.main", *tiny, f"--workdir={root / 'full'}",
                       *whole_batch, "--config.checkpoint_every_steps=1"]),
      cwd=REPO, env=subprocess_env(cache, devices=2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  for case, proc in evaluate_procs.items():
    out, err = proc.communicate(timeout=300)
    results[case] = {"code": proc.returncode, "stdout": out, "stderr": err}
  return results, {"run": run, "nan": nan, "converted": converted, "root": root,
                   "read_only": read_only}


def error_line(result) -> str:
  """The one `error:` line of a failed case; fails if there is a traceback or several."""
  assert result["code"] == 1, result
  assert "Traceback" not in result["stderr"], result["stderr"]
  errors = [x for x in result["stderr"].splitlines() if x.startswith("error: ")]
  assert len(errors) == 1, result["stderr"]
  return errors[0]


def test_help_is_readable(cli):
  results, _ = cli
  text = results["help"]["stdout"]
  assert "python -m pvt_jax.main --config=configs/b0.py --workdir=" in text
  for flag in ("--config:", "--workdir:", "--coordinator_address:", "--num_processes:",
               "--process_id:"):
    assert flag in text


@pytest.mark.parametrize("case, expected", [
    ("unknown_field", "error: unknown config field 'nosuch'"),
    ("unknown_nested_field", "error: unknown config field 'aug.nosuch'"),
    ("unknown_mode", "error: flag --config=configs/b0.py:fast: unknown config mode 'fast'; "
                     "choose from imagenet, runlocal"),
    ("indivisible_batch", "error: global batch_size=3 is not divisible by the 2 devices"),
])
def test_bad_configs_fail_with_one_line(cli, case, expected):
  results, _ = cli
  assert error_line(results[case]) == expected


def test_bad_values_fail_with_one_line_before_the_dataset_is_opened(cli):
  results, paths = cli
  root = paths["root"]
  expected = {
      "zero_batch": "error: batch_size=0 must be positive",
      "negative_batch": "error: batch_size=-8 must be positive",
      "negative_lr": "error: optimizer.base_lr=-0.001 must be positive",
      "overflowing_lr": f"error: optimizer.base_lr=1e+41 gives a learning rate of "
                        f"{1e41 * 8 / 512:g}, which float32 cannot hold",  # x batch 8 / 512
      "unknown_variant": f"error: unknown variant 'b9'; choose from {', '.join(VARIANTS)}",
      "missing_init_from": f"error: init_from {root / 'nonexistent'} does not exist",
      "finetune_without_init_from": "error: this config fine-tunes a converted checkpoint: set "
                                    "--config.init_from=DIR (made by python -m pvt_jax.convert)",
      "workdir_is_a_file": f"error: workdir {root / 'file'} is a file, not a directory",
      "workdir_under_a_file": f"error: workdir {root / 'file' / 'run'}: cannot write there "
                              f"(Not a directory)",
      "typo": "error: unknown config field 'batch_sise'; did you mean 'batch_size'?",
  }
  for case, line in expected.items():
    assert error_line(results[case]) == line, case
  if paths["read_only"]:
    assert error_line(results["read_only_workdir"]) == (
        f"error: workdir {root / 'read_only'}: cannot write there (Read-only file system)"
        if os.geteuid() == 0 else
        f"error: workdir {root / 'read_only'}: cannot write there (Permission denied)")
  assert not (root / "untouched").exists()  # no dataset was prepared for any of them
  configs = sorted(f"configs/{f}" for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and not f.startswith("_"))
  assert error_line(results["missing_config_file"]) == (
      f"error: no config file configs/b9.py; config files in configs/: {', '.join(configs)}")


def test_bad_data_and_checkpoint_paths_fail_with_one_line(cli):
  results, paths = cli
  assert "no_such_dataset" in error_line(results["unknown_dataset"])
  assert "missing" in error_line(results["bad_init_from"])
  assert "missing" in error_line(results["evaluate_missing"])


def test_another_config_does_not_clobber_a_used_workdir(cli):
  """Refused before the dataset is opened or anything written: config.json still names b0, and
  evaluating the workdir (below) still works."""
  results, paths = cli
  line = error_line(results["other_config"])
  assert line.startswith(f"error: workdir {paths['run']} holds checkpoints of another config "
                         f"(variant 'b0' -> 'b1', image_size 64 -> 32); use another --workdir")
  assert json.loads(open(os.path.join(paths["run"], "config.json")).read())["variant"] == "b0"
  assert not (paths["root"] / "untouched").exists()


def test_a_finished_run_started_again_says_so(cli):
  results, paths = cli
  again = results["train_again"]
  assert again["code"] == 0, again["stderr"]
  assert f"{paths['run']}: training finished at step 3" in again["stdout"]
  assert "step 3: eval top-1" in again["stdout"]  # the saved result, not a new evaluation


def test_a_failed_save_stops_the_run_at_once_in_one_line(cli):
  """A disk that takes no file over 1 MB: the first checkpoint (step 1) cannot be written."""
  results, paths = cli
  line = error_line(results["full_disk"])
  assert line == (f"error: {paths['root'] / 'full' / 'checkpoints'}: saving the checkpoint of "
                  f"step 1 failed (File too large)")
  logged = metrics.read_metrics(str(paths["root"] / "full" / metrics.METRICS_FILE))
  assert max(r["step"] for r in logged) <= 2  # it surfaced at once, not at the next save


def test_no_orbax_noise(cli):
  """Saves between evaluations have no metrics by design; evaluate opens read-only on purpose."""
  results, _ = cli
  for case, result in results.items():
    assert "tracked_metric" not in result.get("stderr", ""), case
    assert "read only" not in result.get("stderr", ""), case


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cli,
                                                                           tiny_fashion_mnist):
  results, paths = cli
  line = error_line(results["nan"])
  match = re.fullmatch(r"error: loss is (nan|inf) \(grad norm .*\) at step (\d+); stopped, "
                       r"last good checkpoint: step (\d+)", line)
  assert match, line
  bad_step, kept = int(match.group(2)), int(match.group(3))
  assert 1 < bad_step < 6 and kept == bad_step - 1
  ckpts = checkpointing.TrainCheckpoints(paths["nan"], read_only=True)
  assert max(ckpts.all_steps()) == kept
  config = tiny_config(tiny_fashion_mnist, {**WHOLE_BATCH, "optimizer.base_lr": 1e30})
  params, step = restore_params(paths["nan"], config)
  assert step == kept
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_evaluate_cli_on_training_and_converted_checkpoints(cli):
  results, paths = cli
  assert results["train"]["code"] == 0, results["train"]["stderr"][-2000:]
  assert os.path.isfile(os.path.join(paths["run"], metrics.PLOT_FILE))
  assert os.listdir(os.path.join(paths["run"], "tensorboard"))
  logged = [r for r in metrics.read_metrics(os.path.join(paths["run"], metrics.METRICS_FILE))
            if "eval/top1" in r][-1]
  assert results["evaluate_workdir"]["code"] == 0, results["evaluate_workdir"]["stderr"]
  from_workdir = json.loads(results["evaluate_workdir"]["stdout"].strip().splitlines()[-1])
  assert from_workdir["step"] == logged["step"] == 3
  assert from_workdir["count"] == logged["eval/count"] == 50
  assert from_workdir["top1"] == logged["eval/top1"]
  assert from_workdir["loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)

  assert results["evaluate_converted"]["code"] == 0, results["evaluate_converted"]["stderr"]
  converted = json.loads(results["evaluate_converted"]["stdout"].strip().splitlines()[-1])
  assert converted["count"] == 50 and converted["dataset"] == "fashion_mnist"
  assert 0 <= converted["top1"] <= converted["top5"] <= 1 and np.isfinite(converted["loss"])
