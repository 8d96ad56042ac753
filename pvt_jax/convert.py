"""Converts PVT v2 PyTorch checkpoints to pvt_jax (orbax) checkpoints, and exports them back.

Convert (official `pvt_v2_b*.pth`, timm `pvt_v2_*.in1k`, or HF transformers `OpenGVLab/pvt_v2_*`
weights; .pth/.pt/.bin or .safetensors; layout and variant are detected from the keys and shapes):

  python -m pvt_jax.convert --input=pvt_v2_b2.pth --output=ckpt/b2 [--variant=b2] [--verify]

PVT v1's official classification weights (`pvt_tiny.pth` ... `pvt_large.pth`) convert the same
way, to the variants v1_tiny ... v1_large, and export back in the official layout only (timm and
HF have no PVT v1, hence no --verify for it either):

  python -m pvt_jax.convert --input=pvt_small.pth --output=ckpt/v1_small

Semantic FPN checkpoints in mmseg's layout (`backbone.*` with the official PVT v2 names,
`neck.*`, `decode_head.*` incl. BN statistics; raw or wrapped as {'meta', 'state_dict'}) are
detected from their keys and convert the same way, to {'params', 'batch_stats'}:

  python -m pvt_jax.convert --input=fpn_pvtv2_b2_ade20k.pth --output=ckpt/fpn_b2

RetinaNet checkpoints in mmdet's layout (`backbone.*`, `neck.lateral_convs.*`, `neck.fpn_convs.*`,
`bbox_head.{cls_convs,reg_convs,retina_cls,retina_reg}.*`; e.g. the official
`retinanet_pvt_v2_b2_fpn_1x_coco.pth`) likewise, the classes counted from `retina_cls`:

  python -m pvt_jax.convert --input=retinanet_pvt_v2_b2_fpn_1x_coco.pth --output=ckpt/retina_b2

Export a converted checkpoint (.safetensors needs no torch; .pth/.pt/.bin need torch):

  python -m pvt_jax.convert --export=official|timm|hf --input=ckpt/b2 --output=b2.safetensors
  python -m pvt_jax.convert --export=mmseg --input=ckpt/fpn_b2 --output=fpn_b2.pth
  python -m pvt_jax.convert --export=mmdet --input=ckpt/retina_b2 --output=retina_b2.pth

Notes:
  * --num_classes different from the checkpoint's head drops the head; the metadata records the
    new num_classes, and `pvt_jax.checkpoints.load_pretrained(dir)` (or `replace_head` for
    fine-tuning with config.init_from) initialises a fresh head (truncated normal std .02, zero
    bias). --num_classes=0 keeps only the backbone.
  * HF transformers uses LayerNorm eps 1e-6 in the patch-embedding and spatial-reduction norms
    where the official model uses 1e-5, so HF's own logits differ slightly from official ones.
    Converting an HF checkpoint gives our model, i.e. the official numerics with the HF weights.
  * PyTorch pickles are read with torch.load(weights_only=True) only, so a checkpoint cannot run
    code. Any problem is reported as one line `error: <file>: <what>` with exit status 1, and no
    output is left behind.
"""

import os
import shutil
import sys

from absl import app, flags, logging

from pvt_jax import checkpoints
from pvt_jax.checkpoints import DENSE_LAYOUTS, CheckpointError, DenseConversion, dense, verify
from pvt_jax.models import V2_VARIANTS, VARIANTS, model_name


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defined on demand (by `cli`), so importing this module never clashes with other CLIs' flags."""
  flags.DEFINE_string("input", None, "PyTorch checkpoint (.pth/.pt/.bin/.safetensors) to "
                      "convert; with --export, a converted checkpoint directory.",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "New directory for the converted checkpoint; with "
                      "--export, the file to write (.safetensors, or .pth/.pt/.bin).",
                      flag_values=flag_values)
  flags.DEFINE_enum("variant", None, list(VARIANTS), "Expected variant; conversion fails if the "
                    "weights are another one. Detected from the weights when unset.",
                    flag_values=flag_values)
  flags.DEFINE_integer("num_classes", None, "Classes of the converted model; a value other than "
                       "the checkpoint's drops its head (see above). Default: the checkpoint's.",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_bool("verify", False, "Compare with timm's PyTorch model on a random batch (needs "
                    "torch and timm); fail if logits or stage maps differ by more than "
                    f"{verify.TOLERANCE:g}.", flag_values=flag_values)
  flags.DEFINE_enum("export", None, [*checkpoints.FORMATS, *DENSE_LAYOUTS], "Write the "
                    "converted checkpoint --input as a PyTorch state dict in this layout "
                    "(classification: official/timm/hf; segmentation: mmseg; detection: mmdet).",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["input", "output"], flag_values=flag_values)


def _check_verifiable(variant, check, path) -> None:
  if check and variant not in V2_VARIANTS:
    raise CheckpointError(f"--verify compares with timm, which has no {model_name(variant)}", path)


def _verify(state_dict, variant, model, variables, path) -> None:
  differences = verify.compare_with_timm(state_dict, variant, model, variables)
  print(f"verify against timm pvt_v2_{variant}: {differences}")
  if differences.worst > verify.TOLERANCE:
    raise CheckpointError(f"verification failed: {differences} > {verify.TOLERANCE:g}", path)


def convert(input_path, output, variant=None, num_classes=None, check=False) -> None:
  """PyTorch file -> converted checkpoint directory (removed again if --verify fails)."""
  if os.path.exists(output):
    raise CheckpointError("already exists; remove it or choose another output", output)
  if check and not verify.timm_available():
    raise CheckpointError("--verify needs torch and timm (pip install pvt_jax[test])")
  conversion = checkpoints.convert_any_file(input_path, variant)
  if isinstance(conversion, DenseConversion):
    return _convert_dense(conversion, input_path, output, num_classes, check)
  _check_verifiable(conversion.variant, check, input_path)
  params = conversion.params
  if num_classes is None:
    num_classes = conversion.num_classes
  elif num_classes != conversion.num_classes:
    params = checkpoints.replace_head(params, 0)
  metadata = _metadata(conversion, input_path, num_classes)
  checkpoints.save_converted(output, params, metadata)
  head = ("with head" if "head" in params else
          "no head" if num_classes == 0 else "head dropped, a new one is initialised on load")
  print(f"wrote {output}: {model_name(conversion.variant)}, {num_classes} classes ({head}), "
        f"from {conversion.source_format} layout")
  if check:
    try:
      model, variables = checkpoints.load_pretrained(output, num_classes=checkpoints
                                                     .num_head_classes(params))
      _verify(conversion.state_dict, conversion.variant, model, variables, input_path)
    except BaseException:
      shutil.rmtree(output, ignore_errors=True)
      raise


def _metadata(conversion, input_path, num_classes) -> dict:
  return {"variant": conversion.variant, "num_classes": num_classes, "task": conversion.task,
          "source_file": os.path.abspath(input_path),
          "source_sha256": checkpoints.sha256(input_path),
          "source_format": conversion.source_format}


def _convert_dense(conversion: DenseConversion, input_path, output, num_classes, check) -> None:
  """A dense checkpoint: params and BN statistics; its BN counters go into the metadata, so that
  --export writes the file back as it was."""
  if check:
    raise CheckpointError("--verify compares with timm's classifier; it does not apply to "
                          f"{conversion.source_format} {conversion.task} checkpoints")
  if num_classes not in (None, conversion.num_classes):
    raise CheckpointError(f"--num_classes={num_classes}: a {conversion.task} checkpoint keeps "
                          f"its {conversion.num_classes} classes (fine-tune with init_from)")
  metadata = {**_metadata(conversion, input_path, conversion.num_classes),
              "num_batches_tracked": conversion.num_batches_tracked}
  checkpoints.save_converted(output, conversion.variables["params"], metadata,
                             batch_stats=conversion.variables.get("batch_stats"))  # none: no BN
  print(f"wrote {output}: {conversion.source_format} {conversion.task}, pvt_v2_"
        f"{conversion.variant} backbone, {conversion.num_classes} classes")


def _export_dense(checkpoint, output, fmt) -> None:
  layout = DENSE_LAYOUTS[fmt]
  if checkpoint.task != layout.task:
    raise CheckpointError(f"a {checkpoint.task} checkpoint cannot be exported in the {fmt} "
                          f"{layout.task} layout")
  state_dict = dense.export_state_dict(checkpoint.variables, fmt,
                                       checkpoint.metadata.get("num_batches_tracked"))
  checkpoints.write_state_dict(output, state_dict)
  print(f"wrote {output}: {fmt} layout, {layout.task}, pvt_v2_{checkpoint.metadata['variant']} "
        f"backbone, {checkpoint.metadata['num_classes']} classes")


def export(input_dir, output, fmt, check=False) -> None:
  """Converted checkpoint directory -> PyTorch state dict file in the `fmt` layout."""
  checkpoint = checkpoints.load_converted(input_dir)
  if fmt in DENSE_LAYOUTS or checkpoint.task != "classification":
    if check:
      raise CheckpointError(f"--verify does not apply to {checkpoint.task} checkpoints")
    if fmt not in DENSE_LAYOUTS:
      raise CheckpointError(f"a {checkpoint.task} checkpoint exports to "
                            + "/".join(n for n, lay in DENSE_LAYOUTS.items()
                                       if lay.task == checkpoint.task) + f", not {fmt}")
    return _export_dense(checkpoint, output, fmt)
  if check and not verify.timm_available():
    raise CheckpointError("--verify needs torch and timm (pip install pvt_jax[test])")
  _check_verifiable(checkpoint.metadata["variant"], check, input_dir)
  checkpoints.write_state_dict(output, checkpoints.export_state_dict(checkpoint.params, fmt))
  print(f"wrote {output}: {fmt} layout, {model_name(checkpoint.metadata['variant'])}, "
        f"{checkpoints.num_head_classes(checkpoint.params)} classes")
  if check:
    try:
      exported = checkpoints.convert_file(output)
      model, variables = checkpoints.load_pretrained(input_dir, num_classes=exported.num_classes)
      _verify(exported.state_dict, exported.variant, model, variables, output)
    except BaseException:
      os.remove(output)
      raise


def run(flag_values: flags.FlagValues) -> int:
  """Runs the parsed command; returns the exit status (errors: one line on stderr)."""
  fv = flag_values
  try:
    if fv.export:
      if fv.variant or fv.num_classes is not None:
        raise CheckpointError("--variant and --num_classes apply to conversion, not --export")
      export(fv.input, fv.output, fv.export, fv.verify)
    else:
      convert(fv.input, fv.output, fv.variant, fv.num_classes, fv.verify)
  except CheckpointError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would show every orbax step
  return run(flags.FLAGS)


def cli() -> None:
  define_flags(flags.FLAGS)
  app.run(main)


if __name__ == "__main__":
  cli()
