"""Helpers shared by several test folders, imported as ``tests.helpers.…``.

``nanogpt`` is a model written the old way (capture and pass tests); ``models`` builds the zoo GPT
and batches the compile tests share; ``random_ltd`` is the single-process random-LTD reference;
``cli`` runs the console script and checks one-line errors; ``fake_pg`` starts torch's fake process
group for the runtime unit tests; ``scripts`` holds user scripts that launchers run (torchrun).
``distributed`` holds the per-rank bodies that ``autopar.runtime.spawn`` and ``torchrun`` run in fresh
processes. Those import them by module name: the repository root is on ``sys.path`` through pytest's
``pythonpath`` option, and ``multiprocessing``'s spawn start method hands the parent's ``sys.path``
to each rank.
"""
