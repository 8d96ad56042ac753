"""The newcomer path: README commands, CI script, package metadata, wheel contents, CLIs, lint."""

import ast
import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pvt_jax.configs import classification, detection, segmentation

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIRST_PARTY = {"pvt_jax", "configs", "conftest"}
# Test references whose own import refuses newer releases (mmseg/mmdet need mmcv < 2.2).
EXACT_PINS = {"mmcv-lite"}


def quick_start_commands():
  """The fenced code blocks of the README's "Quick start" section, stripped."""
  section = re.search(r"^## Quick start\n(.*?)^## ", README, re.S | re.M)
  assert section, "README has no '## Quick start' section"
  return [block.strip() for block in re.findall(r"```\w*\n(.*?)```", section.group(1), re.S)]


def read_setup_cfg():
  parser = configparser.ConfigParser()
  parser.read(ROOT / "setup.cfg")
  return parser


def requirement_lines(text):
  return [Requirement(line) for line in (raw.strip() for raw in text.splitlines())
          if line and not line.startswith("#")]


def declared(*extras):
  """Canonical names of requirements that apply here: install_requires plus the given extras."""
  cfg = read_setup_cfg()
  reqs = requirement_lines(cfg["options"]["install_requires"])
  for extra in extras:
    reqs += requirement_lines(cfg["options.extras_require"][extra])
  return {canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate()}


def python_source(path):
  """A .py file's text, or a notebook's code cells without IPython's `!` and `%` lines."""
  if path.suffix != ".ipynb":
    return path.read_text()
  cells = [cell["source"] for cell in json.loads(path.read_text())["cells"]
           if cell["cell_type"] == "code"]
  return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", "".join(cell), flags=re.M)
                   for cell in cells)


def third_party_imports(paths):
  """Top-level module names imported anywhere in `paths`, minus stdlib and first-party ones."""
  names = set()
  for path in paths:
    for node in ast.walk(ast.parse(python_source(path), filename=str(path))):
      if isinstance(node, ast.Import):
        names.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - FIRST_PARTY


def assert_imports_declared(paths, allowed, local=()):
  providers = importlib.metadata.packages_distributions()
  missing = {}
  for module in sorted(third_party_imports(paths) - set(local)):
    dists = {canonicalize_name(d) for d in providers.get(module, [module])}
    if not dists & allowed:
      missing[module] = sorted(dists)
  assert not missing, f"imported but not declared in setup.cfg: {missing}"


def test_readme_has_exactly_two_one_line_quick_start_commands():
  commands = quick_start_commands()
  assert len(commands) == 2, commands
  for command in commands:
    assert "\n" not in command, command
  run, test = commands
  assert "python -m pvt_jax.main" in run and "--config=configs/" in run
  assert "pytest" in test and '".[test]"' in test


def test_ci_runs_the_readme_test_command_verbatim():
  readme_test = quick_start_commands()[1].split("&&")[-1].strip()
  ci_script = (ROOT / ".ci" / "run").read_text()
  ci_tests = [line.split("||")[0].strip() for line in ci_script.splitlines()
              if "pytest" in line and not line.lstrip().startswith("#") and "echo" not in line]
  assert ci_tests == [readme_test]
  # The CI installs what the README's command installs, the same way.
  for step in quick_start_commands()[1].split("&&")[:-1]:
    words = step.split()
    assert any(all(w in line.split() for w in words if w not in ("-y",))
               for line in ci_script.splitlines()), step


def test_ci_script_is_strict_and_fails_when_nothing_is_collected():
  ci_script = ROOT / ".ci" / "run"
  assert os.access(ci_script, os.X_OK)
  text = ci_script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  assert re.search(r"-eq 5\b", text) and 'exit "${status}"' in text


def test_ci_script_exit_status_follows_pytest(tmp_path):
  """Run the script's tail with a stand-in `python` whose pytest exits 0, 1 or 5."""
  script = (ROOT / ".ci" / "run").read_text()
  tail = script[script.index("status=0"):]
  for pytest_rc, expected in [(0, 0), (1, 1), (5, 5)]:
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\nexit {pytest_rc}\n")
    fake.chmod(0o755)
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + tail], capture_output=True,
                            text=True, env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == expected
    assert ("no tests" in result.stderr) == (pytest_rc == 5)


def test_requirements_are_lower_bounds_satisfied_here():
  cfg = read_setup_cfg()
  assert cfg["options"]["python_requires"] == ">=3.11"
  sections = [cfg["options"]["install_requires"], *cfg["options.extras_require"].values()]
  for req in (r for text in sections for r in requirement_lines(text)):
    specs = list(req.specifier)
    if canonicalize_name(req.name) in EXACT_PINS:
      assert [s.operator for s in specs] == ["=="], f"{req}: pinned for a reason, keep it exact"
    else:
      assert [s.operator for s in specs] == [">="], f"{req}: use one lower bound, no pins"
    if req.marker is None or req.marker.evaluate():
      installed = Version(importlib.metadata.version(req.name))
      assert installed in req.specifier, f"{req}: tested version here is {installed}"


def test_every_import_is_declared():
  package = sorted((ROOT / "pvt_jax").rglob("*.py"))
  assert_imports_declared(package, declared("torch"))
  tests = sorted((ROOT / "tests").rglob("*.py"))
  others = tests + sorted((ROOT / "configs").rglob("*.py")) + sorted(
      (ROOT / "notebooks").glob("*.ipynb"))
  assert_imports_declared(others, declared("torch", "test"), local={p.stem for p in tests})


def test_every_package_directory_is_a_package():
  for directory in {p.parent for p in (ROOT / "pvt_jax").rglob("*.py")}:
    if "__pycache__" not in directory.parts:
      assert (directory / "__init__.py").exists(), f"{directory} lacks __init__.py"


def test_wheel_holds_every_module_and_metadata(tmp_path):
  """Build from a copy of the sources so the checkout gets no build/ or egg-info litter."""
  source = tmp_path / "src"
  shutil.copytree(ROOT / "pvt_jax", source / "pvt_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(source)], check=True)
  (wheel,) = (tmp_path / "dist").glob("pvt_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  expected = {p.relative_to(source).as_posix() for p in (source / "pvt_jax").rglob("*.py")}
  expected |= {p.relative_to(source).as_posix()
               for p in (source / "pvt_jax" / "cpu" / "csrc").iterdir()}  # C++ sources
  assert expected <= names, sorted(expected - names)
  assert not any(n.startswith(("tests/", "configs/")) for n in names)
  metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
  assert "Requires-Python: >=3.11" in metadata
  assert "Provides-Extra: test" in metadata and "Provides-Extra: torch" in metadata


def test_readme_points_at_files_and_modules_that_exist():
  for path in set(re.findall(r"\b((?:configs|launch|notebooks|tests)/[\w./]+\.\w+)", README)):
    assert (ROOT / path).exists(), path
  for module in set(re.findall(r"python -m (pvt_jax(?:\.\w+)*)", README)):
    assert importlib.util.find_spec(module) is not None, module
  for script in set(re.findall(r"\blaunch/\w+\.sh\b", README)):
    assert os.access(ROOT / script, os.X_OK), script


def cli_help(module):
  result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert result.returncode in (0, 1), result.stderr[-2000:]  # absl exits 1 after --help
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  return result.stdout


@pytest.mark.parametrize("module, flags", [
    ("pvt_jax.main", ["--config", "--workdir", "--coordinator_address", "--num_processes",
                      "--process_id"]),
    ("pvt_jax.convert", ["--input", "--output", "--variant", "--verify", "--export"]),
    ("pvt_jax.evaluate", ["--checkpoint", "--dataset"]),
])
def test_cli_help_explains_usage_and_key_flags(module, flags):
  text = cli_help(module)
  source = Path(importlib.util.find_spec(module).origin).read_text()
  usage = ast.get_docstring(ast.parse(source)).splitlines()[0]
  assert text.startswith(usage)  # the module docstring comes first, with examples
  for flag in flags:
    assert re.search(rf"^  --(\[no\])?{flag[2:]}:", text, re.M), f"{module}: no {flag}"


def test_repository_is_ruff_clean():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-4000:]


def test_documented_config_overrides_name_real_fields():
  """`--config.FIELD=` in the README and the launchers' usage notes."""
  configs = [classification.get_config("b0"), segmentation.get_config("b0"),
             detection.get_config()]
  docs = README + "".join(p.read_text() for p in sorted((ROOT / "launch").iterdir()))
  overrides = set(re.findall(r"--config\.([\w.]+)=", docs))
  assert len(overrides) > 5
  for field in overrides:
    assert any(has_field(config, field) for config in configs), (
        f"--config.{field} is documented but no task's config has such a field")


def has_field(config, field: str) -> bool:
  node = config
  for part in field.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


def test_readme_benchmark_table_is_the_tools_output_with_its_command():
  results = ROOT / "benchmarks" / "cpu_2core"
  table = (results / "results.md").read_text().strip()
  assert table in README
  recorded = json.loads((results / "results.json").read_text())["command"]
  section = re.search(r"^## Benchmarks\n(.*?)^## ", README, re.S | re.M).group(1)
  shown = re.search(r"```bash\n(python -m pvt_jax.benchmark .*?)\n```", section).group(1)
  # The same command, apart from where the run wrote its files before they were copied here.
  def without_output_dir(command):
    return re.sub(r" --output_dir=\S+", "", command)

  assert without_output_dir(shown) == without_output_dir(recorded)
  assert recorded in table
