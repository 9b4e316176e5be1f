"""``python benchmark.py ...`` from a checkout: files x shots x seeds x methods, mean ± std, resumable.

The implementation is `clip_adapters.benchmark` (installed as the ``clip-adapters-benchmark`` command);
its docstring and ``python benchmark.py --help`` describe the options.
"""
import sys

from clip_adapters.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
