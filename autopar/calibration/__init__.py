"""Calibration of this machine for the local-cluster cost model (``autopar calibrate``).

It sits above the cost models and the runtime: it spawns a gloo group (``autopar.runtime.launch``)
and builds zoo models to measure, then writes the profile that ``cost_models`` reads. Data flow:
``calibrate.calibrate`` → single operations (``ops``) and collectives of a process group
(``group``) → fits (``fits``) → a ``LocalProfile`` saved as JSON. The measuring and fitting functions
are imported from their modules (``autopar.calibration.ops``, ``.group``, ``.fits``).
"""

from autopar.calibration.calibrate import (
    KIB,
    CalibrationConfig,
    build_profile,
    calibrate,
    measure_single_process,
    other_load_warning,
    transformer_shapes,
)

__all__ = ["KIB", "CalibrationConfig", "build_profile", "calibrate", "measure_single_process",
           "other_load_warning", "transformer_shapes"]
