"""The command-line entry points, installed as ``clip-adapters-train`` and ``clip-adapters-evaluate``.

From a checkout, ``python train.py`` and ``python evaluate.py`` run the same code. Only the packages
``adapters``, ``datamodules``, ``callbacks`` and ``clip_adapters`` are installed: no top-level
``train`` or ``evaluate`` module that could shadow another package's.
"""
