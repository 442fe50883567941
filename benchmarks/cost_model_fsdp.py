"""Cost model vs published FSDP / ZeRO-3 throughputs (torchtitan FSDP2, IBM fms-fsdp).

Run: ``.venv/bin/python -m benchmarks.cost_model_fsdp`` (writes ``benchmarks/results/cost_model_fsdp
.json`` and ``.md``). One row per published run through the public path (``benchmarks.published
.fsdp.validate``: ``autopar.plan`` on a Llama-shaped zoo GPT captured on ``meta``, pure FSDP
pinned), the predicted tokens/s per GPU, the published figure, the error and the exposed FSDP
seconds (``cost_models.fsdp``). Then the trend: the torchtitan Llama 3.1 8B row at a fixed global
batch over 8–512 GPUs (predicted only: no published fixed-global-batch figure was found in text form,
``benchmarks.published.fsdp``), and its fixed-local-batch pair 8 → 128 GPUs against the published
pair. No constant is fitted to these rows. Predictions only (about half a minute on a CPU).
"""

from __future__ import annotations

import statistics

from benchmarks.common import environment, write_results
from benchmarks.published.fsdp import ROWS, predicted_tokens_per_s_per_gpu, row_plan, validate

TOLERANCE = 1.5
"""The largest |error| seen (+145 %, the torchtitan H100 rows, whose compute the H100 matmul
efficiency overstates) rounded up; the A100 rows are within 35 %. ``tests/cost_models/test_fsdp_cost.py``
holds every row within it."""
TREND_GPUS = (8, 16, 32, 64, 128, 256, 512)
TREND_GLOBAL_BATCH = 512


def rows() -> list[dict]:
    out = []
    for result in validate():
        row, b = result.row, result.breakdown
        out.append({
            "model": row.model, "num_gpus": row.num_gpus, "local_batch": row.local_batch,
            "recompute": row.recompute, "cluster": row.cluster,
            "predicted_tokens_per_s_per_gpu": round(result.predicted_tokens_per_s_per_gpu),
            "published_tokens_per_s_per_gpu": row.published_tokens_per_s_per_gpu,
            "error_pct": round(100 * result.error, 1), "step_time_s": round(result.step_time_s, 3),
            "fsdp_exposed_s": round(b["dp_comm"], 4),
            "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 1),
            "source": row.source, "quote": row.quote,
        })
    return out


def trend() -> list[dict]:
    """Llama 3.1 8B (torchtitan's H100 rows, selective recomputation, microbatches of 2 sequences) at a
    fixed global batch: per-GPU throughput and the exposed FSDP share as the per-GPU batch shrinks."""
    base, out = ROWS[1], []
    for gpus in TREND_GPUS:
        local = TREND_GLOBAL_BATCH // gpus
        plan = row_plan(base, num_gpus=gpus, local_batch=local)
        b = plan.predicted.breakdown_dict()
        out.append({"num_gpus": gpus, "local_batch": local,
                    "num_microbatches": plan.schedule.num_microbatches,
                    "predicted_tokens_per_s_per_gpu": round(predicted_tokens_per_s_per_gpu(plan)),
                    "fsdp_exposed_pct_of_step": round(100 * b["dp_comm"] / plan.predicted.step_time_s, 1)})
    return out


NOTES = (
    "Each row through the public path: `autopar.plan` on a zoo GPT with the run's Llama shape (same "
    "parameters and matmul FLOPs per layer), captured on meta, pinned to pure FSDP (dp = GPUs, zero 3, "
    "the run's local batch and recomputation). `fsdp s` is the FSDP collective time left exposed per "
    "step (`cost_models.fsdp`: per-layer gathers and reduce-scatters behind each layer's compute).")
WHY = (
    "Why rows are off: the H100 rows (+140 %) are compute, not FSDP: the model runs the 8B layer at "
    "~78 % of the H100's bf16 peak (its matmul efficiency is fitted to one 8192³ matmul), where "
    "torchtitan reports 33–39 % MFU on 500 W HBM2e H100s; FSDP is 1–2 % of the predicted step. The "
    "A100 rows carry the A100 efficiency fitted to Megatron-LM; the 8B (+35 %) and 13B (+20 %) rows run "
    "at high MFU in the model, with no RMSNorm/SwiGLU/RoPE kernel overheads modelled. The fms-fsdp "
    "34B/70B rows (full recomputation, large local batch) are within 4 %.")
HEADER = ("| model | GPUs | local batch | AC | cluster | predicted tok/s/GPU | published | error | step s "
          "| fsdp s | peak GiB | source |")
TREND_HEADER = "| GPUs | local batch | microbatches | predicted tok/s/GPU | FSDP exposed % of step |"


def _row_line(r: dict) -> str:
    cells = (r["model"], r["num_gpus"], r["local_batch"], r["recompute"], r["cluster"],
             r["predicted_tokens_per_s_per_gpu"], r["published_tokens_per_s_per_gpu"],
             f"{r['error_pct']:+.1f} %",
             r["step_time_s"], r["fsdp_exposed_s"], r["peak_memory_gib"], r["quote"])
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(table: list[dict], scaling: list[dict], env: dict) -> str:
    errors = [abs(r["error_pct"]) for r in table]
    first, second = (table[i]["predicted_tokens_per_s_per_gpu"] for i in (0, 1))
    pair = (f"Published fixed-local-batch pair (torchtitan, local batch 2): 8 → 128 GPUs 5,762 → 5,605 "
            f"tok/s/GPU ({100 * (5605 / 5762 - 1):+.1f} %); predicted {first} → {second} "
            f"({100 * (second / first - 1):+.1f} %).")
    lines = [f"# cost model vs published FSDP / ZeRO-3 throughput (commit {env['autopar_commit']})", "",
             NOTES, "", f"median |error| {statistics.median(errors):.1f} %, max {max(errors):.1f} % over "
             f"{len(table)} rows.", "", HEADER, "|---" * 12 + "|", *map(_row_line, table), "",
             "Sources: " + "; ".join(sorted({r["source"] for r in table})) + ".", "", WHY, "",
             f"## Trend: Llama 3.1 8B at a fixed global batch of {TREND_GLOBAL_BATCH} sequences "
             "(predicted only)", "", "No published fixed-global-batch FSDP figure could be read as text "
             "(see `benchmarks/published/fsdp.py`). " + pair, "", TREND_HEADER, "|---" * 5 + "|"]
    lines += [f"| {r['num_gpus']} | {r['local_batch']} | {r['num_microbatches']} | "
              f"{r['predicted_tokens_per_s_per_gpu']} | {r['fsdp_exposed_pct_of_step']} |" for r in scaling]
    return "\n".join(lines)


def main() -> None:
    env = environment(mark_uncommitted=True)
    table, scaling = rows(), trend()
    _, md = write_results("cost_model_fsdp", {"environment": env, "rows": table, "trend": scaling,
                                              "tolerance": TOLERANCE}, markdown(table, scaling, env))
    print(md.read_text())


if __name__ == "__main__":
    main()
