"""``python evaluate.py ...`` from a checkout: compare few-shot heads and exported adapters on feature files.

The implementation is `clip_adapters.evaluate` (installed as the ``clip-adapters-evaluate`` command);
its docstring and ``python evaluate.py --help`` describe the options.
"""
import sys

from clip_adapters.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
