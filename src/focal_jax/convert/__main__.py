"""Convert a torchvision checkpoint: `python -m focal_jax.convert --from-torchvision FILE.pth --variant NAME --out DIR`."""

from __future__ import annotations

import argparse
import sys

from focal_jax._cli import run_command
from focal_jax.convert.torchvision import VARIANTS, from_torchvision, load_torch_state_dict, save_pretrained


def main(argv=None) -> int:
  """Reads the `.pth` file (weights only), converts it and writes the orbax checkpoint; 2 on bad input."""
  parser = argparse.ArgumentParser(
      prog="python -m focal_jax.convert",
      description="Convert a torchvision state dict into an orbax checkpoint of focal_jax variables.",
      epilog="Train or evaluate from it with: python -m experiments.coco_retinanet --train.init_checkpoint=DIR")
  parser.add_argument("--from-torchvision", required=True, metavar="FILE.pth",
                      help="a torchvision state dict (read with torch.load(weights_only=True))")
  parser.add_argument("--variant", required=True, choices=VARIANTS, help="the torchvision model it belongs to")
  parser.add_argument("--out", required=True, metavar="DIR", help="the directory to create")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
  args = parser.parse_args(argv)

  def run() -> int:
    converted = from_torchvision(load_torch_state_dict(args.from_torchvision), args.variant)
    out = save_pretrained(args.out, converted, args.variant, source=args.from_torchvision)
    print(f"wrote {out}: {args.variant} from {args.from_torchvision}")
    return 0

  return run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
