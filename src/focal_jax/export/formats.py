"""Writing the serving function (`focal_jax.export.serving`) in each deployment format.

| format | file in the export dir | batch | runs with |
| --- | --- | --- | --- |
| stablehlo | detector.stablehlo (`jax.export` serialized, CPU + CUDA + TPU) | any | `jax.export.deserialize` |
| saved_model | saved_model/ (`serving_default`) | fixed | `tf.saved_model.load` |
| tflite | detector.tflite | fixed | LiteRT with TF ops (`ai_edge_litert`) |
| onnx | refused: no converter takes the program (see `write_onnx`) | - | - |

The SavedModel and the LiteRT file hold the same StableHLO program inside one
TF `XlaCallModule` op, serialized at the StableHLO version of the installed
TensorFlow (it cannot read newer ones); TF and LiteRT run it with XLA. Its
shapes are static: TF's shape refinement does not take the symbolic batch of
the program's sort-based top-k.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from pathlib import Path

import jax
import jax.extend.mlir
import jax.numpy as jnp

from focal_jax._extras import require

STABLEHLO_FILE = "detector.stablehlo"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "detector.tflite"
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
SIGNATURE = "serving_default"
INPUT_NAME = "images"


class ExportError(ValueError):
  """A format cannot hold the program (the message names what stops it)."""


def _input_spec(batch_size: int | None, image_size: tuple[int, int]) -> jax.ShapeDtypeStruct:
  batch = jax.export.symbolic_shape("batch")[0] if batch_size is None else batch_size
  return jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.uint8)


def write_stablehlo(detect, image_size: tuple[int, int], batch_size: int | None, out: Path) -> str:
  """Serializes `detect` with `jax.export` for CPU, CUDA and TPU; batch symbolic unless `batch_size`."""
  exported = jax.export.export(jax.jit(detect), platforms=STABLEHLO_PLATFORMS)(
      _input_spec(batch_size, image_size))
  (out / STABLEHLO_FILE).write_bytes(exported.serialize())
  return STABLEHLO_FILE


def write_saved_model(detect, image_size: tuple[int, int], batch_size: int, out: Path) -> str:
  """A TF SavedModel whose `serving_default` runs `detect` (as one XlaCallModule op)."""
  tf = require("tensorflow")
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.tf2xla.python import xla as tf_xla  # pylint: disable=g-import-not-at-top

  exported = jax.export.export(jax.jit(detect), platforms=("cpu", "cuda"))(_input_spec(batch_size, image_size))
  # The StableHLO version that this TensorFlow reads (jax.export writes a newer one).
  module = jax.extend.mlir.serialize_portable_artifact(exported.mlir_module(), tf_stablehlo.get_current_version())
  names = jax.tree.unflatten(exported.out_tree, range(len(exported.out_avals)))

  @tf.function(input_signature=[tf.TensorSpec((batch_size, *image_size, 3), tf.uint8, name=INPUT_NAME)],
               autograph=False)
  def serve(images):
    outputs = tf_xla.call_module(
        [images], version=exported.calling_convention_version, module=module,
        Tout=[tf.as_dtype(aval.dtype) for aval in exported.out_avals],
        Sout=[aval.shape for aval in exported.out_avals],
        platforms=[platform.upper() for platform in exported.platforms])
    return {name: outputs[index] for name, index in names.items()}

  holder = tf.Module()
  holder.serve = serve
  tf.saved_model.save(holder, str(out / SAVED_MODEL_DIR), signatures={SIGNATURE: serve})
  return SAVED_MODEL_DIR


def write_tflite(detect, image_size: tuple[int, int], batch_size: int, out: Path) -> str:
  """A LiteRT flatbuffer converted from the SavedModel (its XlaCallModule op as a TF op)."""
  tf = require("tensorflow")
  with tempfile.TemporaryDirectory() as scratch:
    write_saved_model(detect, image_size, batch_size, Path(scratch))
    converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(scratch) / SAVED_MODEL_DIR))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    try:
      flatbuffer = converter.convert()
    except Exception as error:  # pylint: disable=broad-except  (the converter's ConverterError and others)
      raise ExportError(f"tflite: the LiteRT converter does not take {_refused_ops(str(error))}. Nothing was "
                        "written; export stablehlo or saved_model instead.") from None
  (out / TFLITE_FILE).write_bytes(flatbuffer)
  return TFLITE_FILE


def _refused_ops(message: str) -> str:
  """The ops a converter's error message refuses, with where they come from (`file:line`), in one line."""
  found = re.findall(r"([\w./]+\.py):(\d+):\d+: error: '([\w.]+)' op ([^\n]*)", message)
  if not found:
    return f"the program ({message.strip().splitlines()[-1] if message.strip() else 'no reason given'})"
  return "; ".join(sorted({f"the op {op} ({Path(file).name}:{line}: {reason.rstrip('.')})"
                           for file, line, op, reason in found}))


def write_onnx(detect, image_size: tuple[int, int], batch_size: int, out: Path) -> str:
  """Tries tf2onnx on the SavedModel's function; raises ExportError naming the op it cannot convert.

  JAX lowers to StableHLO only, and the SavedModel carries it in an
  XlaCallModule op, which tf2onnx (1.17) has no conversion for: no ONNX file
  is written. The attempt is kept so that a converter that learns the op is
  picked up as it is.
  """
  tf = require("tensorflow")
  tf2onnx = require("tf2onnx")
  with tempfile.TemporaryDirectory() as scratch:
    write_saved_model(detect, image_size, batch_size, Path(scratch))
    serve = tf.saved_model.load(str(Path(scratch) / SAVED_MODEL_DIR)).signatures[SIGNATURE]
    spec = [tf.TensorSpec((batch_size, *image_size, 3), tf.uint8, name=INPUT_NAME)]
    with _failed_ops("tf2onnx") as failed:
      try:
        model, _ = tf2onnx.convert.from_function(tf.function(lambda images: serve(images=images)),
                                                 input_signature=spec, opset=17)
      except Exception as error:  # pylint: disable=broad-except  (tf2onnx raises many kinds)
        ops = ", ".join(sorted(failed)) or "unknown"
        raise ExportError(
            f"onnx: tf2onnx cannot convert the op {ops}, which carries the StableHLO program (JAX lowers to "
            f"StableHLO only; ONNX needs TF or ONNX ops) ({type(error).__name__}). Nothing was written; "
            f"export stablehlo, saved_model or tflite instead.") from None
  path = out / "detector.onnx"
  path.write_bytes(model.SerializeToString())
  return path.name


@contextlib.contextmanager
def _failed_ops(logger_name: str):
  """Collects the op types that a converter's log reports as failed (`... op: "Name"`)."""
  failed: set[str] = set()

  class Collect(logging.Handler):

    def emit(self, record):
      message = record.getMessage()
      if "convert failed" in message and 'op: "' in message:
        failed.add(message.split('op: "', 1)[1].split('"', 1)[0])

  handler = Collect(level=logging.ERROR)
  logger = logging.getLogger(logger_name)
  logger.addHandler(handler)
  try:
    yield failed
  finally:
    logger.removeHandler(handler)


WRITERS = {"stablehlo": write_stablehlo, "saved_model": write_saved_model, "tflite": write_tflite,
           "onnx": write_onnx}
FORMATS = tuple(WRITERS)
SYMBOLIC_BATCH_FORMATS = ("stablehlo",)
