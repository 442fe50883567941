"""How much the prediction of one set of measured steps moves between calibrations of the same machine.

Run: ``.venv/bin/python -m benchmarks.calibration_repeatability [--count 4] [--seconds 80]
[--measured benchmarks/results/cost_model_cpu_speed_gated.json]`` (writes
``benchmarks/results/calibration_repeatability.json`` and ``.md``).

Data flow: ``autopar.calibration.calibrate`` ``--count`` times in a row (each ``--seconds`` of wall
clock, profiles in a temporary folder) → for each profile, the local cost model's prediction of
every step that ``--measured`` (a ``benchmarks.cost_model_cpu`` results file) measured, through
``cost_model_cpu.result_row`` → per calibration: the signed and absolute median error, the largest
error, the share predicted too fast, and the fitted quantities that moved most (nn.Linear roll-off,
activation re-read, the compute share of 2 and 4 busy processes).

Why: a local plan's prediction is only as repeatable as the calibration it is priced from. On a
shared VM whose speed drifts over seconds, two 80-s calibrations an hour apart fitted rates 10–15 %
apart while the steps they predicted ran within 2 % of each other; this measures that spread
directly, with the steps held fixed. Timings here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from autopar.cost_models.local.profile import LocalProfile

RESULTS = Path(__file__).resolve().parent / "results"


def prediction_errors(profile: LocalProfile, measured: dict[str, Any]) -> list[float]:
    """Signed % errors of ``profile``'s predictions of the steps in ``measured`` (a results file)."""
    from benchmarks.cost_model_cpu import result_row

    raws = [row | {"plan": json.dumps(row["plan"])} for row in measured["rows"]]
    return [result_row(raw, profile)["error_pct"] for raw in raws]


def calibration_row(profile: LocalProfile, errors: list[float]) -> dict[str, Any]:
    """One calibration's summary: its errors over the fixed steps and its most variable fits."""
    shares = {n: round(compute, 3) for n, compute, _ in profile.cpu.shares}
    return {"created": profile.created, "calibration_time_s": profile.calibration_time_s,
            "signed_median_error_pct": round(statistics.median(errors), 1),
            "median_abs_error_pct": round(statistics.median(abs(e) for e in errors), 1),
            "max_abs_error_pct": round(max(abs(e) for e in errors), 1),
            "share_predicted_too_fast": round(sum(e < 0 for e in errors) / len(errors), 2),
            "linear_tile_dim": profile.cpu.linear_tile_dim,
            "linear_peak_gflops": round(profile.cpu.linear_peak_flops_per_s / 1e9, 1),
            "activation_reread_s_per_byte": profile.cpu.activation_reread_s_per_byte,
            "compute_share_2": shares.get(2), "compute_share_4": shares.get(4),
            "machine_speed": profile.measurements.get("environment", {}).get("machine_speed")}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    signed = [r["signed_median_error_pct"] for r in rows]
    lines = [
        f"# calibration repeatability ({env['count']} calibrations of {env['seconds']:g} s, commit "
        f"{env['autopar_commit']})", "",
        "Command: `.venv/bin/python -m benchmarks.calibration_repeatability --count "
        f"{env['count']} --seconds {env['seconds']:g}`. Each calibration predicts the same "
        f"{env['num_steps_measured']} measured steps of `{env['measured']}` (measured at commit "
        f"{env['measured_commit']}).", "",
        f"**Signed median error from {min(signed):+.1f} to {max(signed):+.1f} %** over the calibrations "
        f"(spread {max(signed) - min(signed):.1f} points).", "",
        "The machine's speed probe (``measure_machine_speed``: GPT block + 64 MiB copy per wall second) at "
        "each calibration's start and end is shown beside it; the measured run was timed while the probe "
        f"read {env.get('measured_speed_reference') or 'an unrecorded speed'} (± 6 %). A calibration taken "
        "while the machine runs faster than it did then predicts those steps too fast for that reason alone.",
        "",
        "| calibrated at | probe start / end | signed median % | median abs % | max abs % | too fast | "
        "nn.Linear T | re-read ps/byte | share 2 | share 4 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = r.get("machine_speed") or {}
        probe = " / ".join(f"{speed[k]:.1f}" if speed.get(k) else "–" for k in ("start", "end"))
        lines.append(f"| {r['created']} | {probe} | {r['signed_median_error_pct']:+.1f} | "
                     f"{r['median_abs_error_pct']:.1f} | {r['max_abs_error_pct']:.1f} | "
                     f"{r['share_predicted_too_fast']:.0%} | "
                     f"{r['linear_tile_dim']:.3g} | {r['activation_reread_s_per_byte'] * 1e12:.0f} | "
                     f"{r['compute_share_2']} | {r['compute_share_4']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from autopar.calibration import calibrate
    from benchmarks.common import _atomic_write, environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=80.0)
    parser.add_argument("--measured", default=str(RESULTS / "cost_model_cpu_speed_gated.json"))
    args = parser.parse_args()
    if args.count < 2:
        raise SystemExit(f"--count {args.count} is invalid: repeatability needs at least 2 calibrations")
    measured = json.loads(Path(args.measured).read_text())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.count):
            profile, _ = calibrate(out=os.path.join(folder, f"profile-{index}.json"), seconds=args.seconds)
            rows.append(calibration_row(profile, prediction_errors(profile, measured)))
            print(json.dumps(rows[-1]), flush=True)
    env = environment(mark_uncommitted=True) | {
        "count": args.count, "seconds": args.seconds,
        "measured": os.path.relpath(args.measured, RESULTS.parent.parent),
        "measured_commit": measured["environment"]["autopar_commit"],
        "num_steps_measured": len(measured["rows"]),
        "measured_speed_reference": _rounded(measured["environment"].get("speed_reference"))}
    _atomic_write(RESULTS / "calibration_repeatability.json",
                  json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    _atomic_write(RESULTS / "calibration_repeatability.md", _markdown(rows, env))
    print((RESULTS / "calibration_repeatability.md").read_text())


if __name__ == "__main__":
    main()
