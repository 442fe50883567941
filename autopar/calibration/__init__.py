"""Calibration of this machine for the local-cluster cost model (``autopar calibrate``).

It sits above the cost models and the runtime: it spawns a gloo group (``autopar.runtime.launch``)
and builds zoo models to measure, then writes the profile that ``cost_models`` reads. Data flow:
``calibrate.calibrate`` → single operations (``ops``) and collectives of a process group
(``group``) → fits (``fits``) → a ``LocalProfile`` saved as JSON.
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
from autopar.calibration.fits import fit_alpha_beta, fit_matmul_curve, fit_matmul_peak, ring_coefficients
from autopar.calibration.group import measure_collective_time_s, measure_p2p_time_s
from autopar.calibration.ops import (
    COLD_WORKING_SET_BYTES,
    MIB,
    attention_flops,
    cpu_seconds,
    fastest_s,
    measure_attention_time_s,
    measure_elementwise_time_s,
    measure_linear_time_s,
    measure_matmul_time_s,
    measure_memory_time_s,
    measure_op_overhead_s,
    measure_op_time_s,
    measure_optimizer_time_s,
    measure_training_op_overhead_s,
    measure_transformer_layer_time_s,
    one_thread,
    others_busy_cores,
)

__all__ = [
    "COLD_WORKING_SET_BYTES", "KIB", "MIB", "CalibrationConfig", "attention_flops", "build_profile",
    "calibrate", "cpu_seconds", "fastest_s", "fit_alpha_beta", "fit_matmul_curve", "fit_matmul_peak",
    "measure_attention_time_s", "measure_collective_time_s", "measure_elementwise_time_s",
    "measure_linear_time_s", "measure_matmul_time_s", "measure_memory_time_s", "measure_op_overhead_s",
    "measure_op_time_s", "measure_optimizer_time_s", "measure_p2p_time_s", "measure_single_process",
    "measure_training_op_overhead_s", "measure_transformer_layer_time_s", "one_thread", "other_load_warning",
    "others_busy_cores", "ring_coefficients", "transformer_shapes",
]
