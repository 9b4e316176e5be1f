"""``python train.py ...`` from a checkout: the LightningCLI entry point (fit / validate / test / predict).

The implementation is `clip_adapters.train` (installed as the ``clip-adapters-train`` command); its
docstring and ``python train.py --help`` describe the options.
"""
import sys

from clip_adapters.train import main

if __name__ == "__main__":
    sys.exit(main())
