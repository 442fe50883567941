"""Calibration of this machine for the cost model (``autopar calibrate``).

It sits above the cost models and the runtime: it spawns a gloo group (``autopar.runtime.launch``)
and builds zoo models to measure, then writes the profile that ``cost_models`` reads. Data flow:
``calibrate.calibrate`` → single operations (``ops``, with the primitives it shares with the quick
built-in measurement, ``cost_models.local.measure``) and collectives of a process group (``group``),
every measurement a task with a slot of one time budget and one progress line (``progress``) →
fits (``fits``) → a ``LocalProfile`` saved as JSON. On a GPU, ``device.calibrate_gpu`` measures
matmul by shape, SDPA and Triton attention, bandwidth and NCCL, and writes a GPU profile with a
cluster file for ``autopar plan --cluster``. The measuring and fitting functions are imported from
their modules (``autopar.calibration.ops``, ``.group``, ``.fits``, ``.device``).
"""

from autopar.calibration.calibrate import (
    KIB,
    CalibrationConfig,
    build_profile,
    calibrate,
    calibration_speed,
    measure_single_process,
    other_load_warning,
    profile_id,
    transformer_shapes,
)

__all__ = ["KIB", "CalibrationConfig", "build_profile", "calibrate", "calibration_speed",
           "measure_single_process", "other_load_warning", "profile_id", "transformer_shapes"]
