"""Export a trained detector: `python -m focal_jax.export --checkpoint WORKDIR --format FORMAT --out DIR`."""

from __future__ import annotations

import argparse
import sys

from focal_jax._cli import run_command
from focal_jax.export import FORMATS, export_workdir


def main(argv=None) -> int:
  """Exports a work dir's checkpoint; 0 done, 2 (with one `error:` line) when nothing could be written."""
  parser = argparse.ArgumentParser(
      prog="python -m focal_jax.export",
      description="Export a training work dir's detector (pre-processing, network, post-processing) to run "
                  "without focal_jax. The folder --out gets the program, metadata.json and detect.py.")
  parser.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                      help="a training work dir (the --workdir of python -m experiments.coco_retinanet)")
  parser.add_argument("--format", required=True, choices=FORMATS,
                      help="stablehlo (jax.export, any batch), saved_model (TF), tflite (LiteRT with TF ops); "
                           "onnx says why it cannot be written")
  parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
  parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                      help="the size of the images the program takes (default: the model's input size)")
  parser.add_argument("--batch_size", type=int, metavar="N",
                      help="images per call (default: any number for stablehlo, 1 for the others)")
  parser.add_argument("--score_threshold", type=float, metavar="S",
                      help="keep detections scoring above S, in [0, 1] (default: the run's "
                           "postprocess.score_threshold)")
  parser.add_argument("--step", type=int, metavar="N", help="the checkpoint to export (default: the latest)")
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
  args = parser.parse_args(argv)

  def run() -> int:
    out = export_workdir(args.checkpoint, args.format, args.out, step=args.step, image_size=args.image_size,
                         batch_size=args.batch_size, score_threshold=args.score_threshold,
                         overwrite=args.overwrite)
    print(f"wrote {out}: {args.format} of {args.checkpoint}")
    return 0

  return run_command(run, debug=args.debug, interrupted=f"interrupted; {args.out} was not written.")


if __name__ == "__main__":
  sys.exit(main())
