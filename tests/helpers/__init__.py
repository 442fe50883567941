"""Helpers shared by several test folders, imported as ``tests.helpers.…``.

``nanogpt`` is a model written the old way (capture and pass tests); ``distributed`` holds the
per-rank bodies that ``autopar.runtime.spawn`` and ``torchrun`` run in fresh processes. Those
import them by module name: the repository root is on ``sys.path`` through pytest's ``pythonpath``
option, and ``multiprocessing``'s spawn start method hands the parent's ``sys.path`` to each rank.
"""
