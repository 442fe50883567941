"""A small corpus folder for the data tests: generated Python modules (the same every run), a README, and
files the corpus must skip or not list (binary, Latin-1, a ``.bin``)."""

import random

WORDS = ["alpha", "beta", "gamma", "delta", "value", "index", "total", "count", "name", "items", "result",
         "table", "width", "height", "offset", "buffer", "token", "stream", "window", "batch"]


def source_file(rng: random.Random, number: int) -> str:
    """A small Python module: a docstring and a few functions built from ``WORDS``."""
    lines = [f'"""Module {number}: helpers for {rng.choice(WORDS)} and {rng.choice(WORDS)}."""', ""]
    for _ in range(rng.randint(3, 8)):
        name, args = rng.choice(WORDS), rng.sample(WORDS, 2)
        lines += [f"def {name}_{rng.randint(0, 99)}({args[0]}, {args[1]}=None):",
                  f"    # combine {args[0]} with {args[1]}",
                  f"    {rng.choice(WORDS)} = [{args[0]} * i for i in range({rng.randint(2, 50)})]",
                  f"    if {args[1]} is not None:",
                  f"        return sum({args[0]} for _ in range(len({args[1]}))) + {rng.randint(0, 9)}",
                  f"    return {args[0]}  # ünïcode ✓", ""]
    return "\n".join(lines) + "\n"


def write_corpus(folder, *, num_files: int = 60, seed: int = 0) -> None:
    """``num_files`` modules in two sub-folders, a README, a binary ``.txt`` and an ignored ``.bin``."""
    rng = random.Random(seed)
    for number in range(num_files):
        path = folder / ("pkg" if number % 2 else "lib") / f"module_{number:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source_file(rng, number), encoding="utf-8")
    (folder / "README.md").write_text("# Generated corpus\n\nSmall modules for the data tests.\n")
    (folder / "pkg" / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (folder / "pkg" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "data.bin").write_bytes(bytes(range(256)))
