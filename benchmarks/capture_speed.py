"""Capture speed: how long ``autopar.capture`` takes on zoo and Hugging Face models.

Run: ``.venv/bin/python -m benchmarks.capture_speed`` (writes
``benchmarks/results/capture_speed.json`` and ``.md``). Large models are built and
captured on the ``meta`` device (no weights allocated); tiny ones on the CPU. One
row per case: build and capture seconds (median of ``--repeat`` runs), graph size,
parameters and forward FLOPs. Timings here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import autopar

RESULTS = Path(__file__).parent / "results"

ZOO_CASES = [
    ("gpt-tiny", "cpu", 8, None),
    ("bert-tiny", "cpu", 8, None),
    ("gpt2", "meta", 8, 1024),
    ("gpt2-xl", "meta", 8, 1024),
    ("bert-large", "meta", 8, 512),
    ("gpt3-13b", "meta", 1, 2048),
    ("gpt3-175b", "meta", 1, 2048),
    ("megatron-1t", "meta", 1, 2048),
]

HF_CASES = {
    "hf-gpt2-small": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=12, n_embd=768, n_head=12)),
    "hf-llama-7b": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, intermediate_size=11008,
        vocab_size=32000)),
}


def _time(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def zoo_row(name: str, device: str, batch: int, seq: int | None, repeat: int) -> dict:
    build_s, model = _time(lambda: autopar.models.build(name, device=device), repeat)
    inputs, _ = autopar.models.example_batch(model, batch_size=batch, seq_len=seq)
    capture_s, cap = _time(lambda: autopar.capture(model, inputs), repeat)
    return _row(name, device, batch, inputs.shape[1], build_s, capture_s, cap)


def hf_row(name: str, repeat: int) -> dict:
    import transformers as tf

    cls_name, config_name, fields = HF_CASES[name]
    config = getattr(tf, config_name)(use_cache=False, **fields)

    def build():
        with torch.device("meta"):
            return getattr(tf, cls_name)(config)

    build_s, model = _time(build, repeat)
    ids = torch.zeros(1, 1024, dtype=torch.long, device="meta")
    capture_s, cap = _time(lambda: autopar.capture(model, ids), repeat)
    return _row(name, "meta", 1, 1024, build_s, capture_s, cap)


def _row(name, device, batch, seq, build_s, capture_s, cap) -> dict:
    return {
        "case": name, "device": device, "batch": batch, "seq_len": int(seq),
        "frontend": cap.frontend, "layers": len(cap.layers),
        "graph_nodes": len(cap.graph_module.graph.nodes),
        "params": cap.param_count, "flops_fwd": cap.flops_fwd,
        "build_s": round(build_s, 3), "capture_s": round(capture_s, 3),
    }


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"autopar_commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cores": os.cpu_count()}


def write(rows: list[dict], env: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = json.dumps({"environment": env, "rows": rows}, indent=2) + "\n"
    (RESULTS / "capture_speed.json").write_text(payload)
    columns = ("case", "device", "batch×seq", "front end", "layers", "nodes", "params", "fwd FLOPs",
               "build s", "capture s")
    header = "| " + " | ".join(columns) + " |"
    lines = [f"# capture speed ({env['cores']} cores, torch {env['torch']}, commit {env['autopar_commit']})",
             "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['device']} | {r['batch']}×{r['seq_len']} | {r['frontend']} | "
                     f"{r['layers']} | {r['graph_nodes']} | {r['params'] / 1e9:.3f} B | "
                     f"{r['flops_fwd'] / 1e12:.2f} T | {r['build_s']} | {r['capture_s']} |")
    (RESULTS / "capture_speed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [zoo_row(*case, repeat=args.repeat) for case in ZOO_CASES]
    rows += [hf_row(name, args.repeat) for name in HF_CASES]
    write(rows, environment())
    print((RESULTS / "capture_speed.md").read_text())


if __name__ == "__main__":
    main()
