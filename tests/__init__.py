"""autopar's tests. A regular package so that ``tests.helpers`` resolves here first, whatever else
on ``sys.path`` is named ``tests``; pytest puts the repository root on ``sys.path`` (the
``pythonpath`` option in pyproject.toml), and spawned ranks inherit it."""
