"""Measurements bounded by time, not by repeat counts: ``timed_s`` and the task runner, the
emulated-dtype detection and the matmul shapes skipped when one call would not fit; the quick
built-in measurement that prices local plans without a saved calibration (cached per process and
on disk, labelled "quick" in the plan); the GPU calibration's code path, run on CPU tensors."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from autopar.calibration.device import (
    GpuConfig,
    build_gpu_profile,
    calibrate_gpu,
    catalog_name,
    cluster_path,
    device_timed_s,
)
from autopar.calibration.progress import Progress, Skip, Task, run_tasks
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import estimate
from autopar.cost_models.compute import matmul_time_s
from autopar.cost_models.local import measure, rates
from autopar.cost_models.local.rates import CpuRates, quick_rates_as

calibrate_module = importlib.import_module("autopar.calibration.calibrate")  # the module, not the function


def test_timed_s_stops_at_its_seconds_not_a_count() -> None:
    calls = []

    def tick() -> None:
        calls.append(1)
        time.sleep(0.002)

    start = time.perf_counter()
    measure.timed_s(tick, seconds=0.05, clock=time.perf_counter)
    # at least the slot, then it stops: a warm-up and one batch at least, never more calls than fit
    # (bounds loose enough for a loaded machine: a count-bound loop would be far outside them)
    assert 0.05 <= time.perf_counter() - start < 2.0 and 2 <= len(calls) <= 0.05 / 0.002 + 2
    slow = []
    start = time.perf_counter()
    best = measure.timed_s(lambda: (slow.append(1), time.sleep(0.05)), seconds=0.01, clock=time.perf_counter)
    assert len(slow) == 1 and best >= 0.05  # one call longer than the slot is the measurement
    assert time.perf_counter() - start < 1.0


def test_tasks_share_the_budget_and_say_what_they_skipped() -> None:
    lines: list[str] = []

    class Lines:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    def quick(slot: float) -> float:
        return slot  # uses nothing of its slot: the rest flows to the next tasks

    def skipped(slot: float) -> float:
        raise Skip(f"one call would take 9 s, over its {slot:.2f} s slot")

    def sleeper(slot: float) -> float:
        time.sleep(slot)
        return slot

    tasks = [Task("a", quick, weight=1.0), Task("b", skipped), Task("c", sleeper, weight=2.0)]
    values, records = run_tasks(tasks, seconds=0.3, progress=Progress(stream=Lines()))  # type: ignore[arg-type]
    assert values["a"] == pytest.approx(0.075, abs=0.01)  # 1 of 4 weights
    assert values["b"] is None and values["c"] == pytest.approx(0.3, abs=0.02)  # all that the others left
    assert [r["name"] for r in records] == ["a", "b", "c"]
    assert records[1]["result"].startswith("skipped: one call would take 9 s")
    text = "".join(lines)
    assert text.count("calibrate [") == 3 and "b: skipped: one call" in text


def test_emulated_dtypes_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(measure.EMULATED_ENV, raising=False)
    monkeypatch.setattr(measure, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only EPYC
    found = measure.emulated_dtypes()
    assert set(found) == {"bf16", "fp16"} and "avx512_bf16/amx_bf16" in found["bf16"]
    monkeypatch.setattr(measure, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_fp16"}))
    assert measure.emulated_dtypes() == {}
    monkeypatch.setenv(measure.EMULATED_ENV, "bf16")
    assert list(measure.emulated_dtypes()) == ["bf16"]
    monkeypatch.setattr(measure, "cpu_flags", lambda: frozenset())  # no /proc/cpuinfo: not guessed
    monkeypatch.setenv(measure.EMULATED_ENV, "")
    assert measure.emulated_dtypes() == {}


def test_matmul_shapes_that_would_not_fit_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An emulated-speed dtype (the probe says 10 MFLOP/s): every shape skipped from the probe's rate
    alone, in milliseconds, and the probe stands for them."""
    monkeypatch.setattr(calibrate_module, "measure_probe_flops_per_s", lambda dtype, seconds: 1e7)
    config = calibrate_module.CalibrationConfig(
        matmul_shapes=((512, 512, 512),), low_precision_shapes=((1024, 1024, 1024),), cold_pool_bytes=2**22)
    points: dict[str, list[dict[str, Any]]] = {}
    tasks = calibrate_module._matmul_tasks(config, {}, points)
    start = time.perf_counter()
    values, records = run_tasks(tasks, seconds=1.0, progress=Progress(enabled=False))
    assert time.perf_counter() - start < 0.5
    skipped = [r for r in records if r["result"].startswith("skipped: one call would take")]
    assert len(skipped) == 3  # one shape per dtype
    assert all(len(points[d]) == 1 and points[d][0]["warm"] for d in ("fp32", "bf16", "fp16"))
    assert "the probe stands for them" in records[-1]["result"]


# --- the quick built-in measurement ---------------------------------------------------------------
def _fake_quick(*, seconds: float = 3.0, progress: Any = None, ops: Any = (), kinds: Any = ()
                ) -> dict[str, Any]:
    """quick_measurements' shape with round numbers (the real one is timed below, once)."""
    ops = [{"op": op, "elements": n, "forward_s": n * 1e-9, "train_s": n * 3e-9}
           for op in rates.ELEMENTWISE_OPS for n in (2**16, 2**20)]
    collectives = [{"kind": k, "num_ranks": n, "size_bytes": s, "time_s": 1e-4 + s / 1e9}
                   for n in (2, 4) for k in rates.COLLECTIVE_KINDS if k != "p2p" or n == 2
                   for s in (4096, 2**22)]
    return {"linear": [{"m": m, "k": m, "n": m, "time_s": 6 * m**3 / 1e11} for m in (128, 256, 512)],
            "attention": [{"batch": 4, "heads": 8, "seq": 128, "head_dim": 32, "forward_s": 1e-3,
                           "forward_backward_s": 3e-3}],
            "math_attention": {"scores": 2**19, "forward_s": 2e-3, "train_s": 5e-3}, "ops": ops,
            "copy": {"bytes": 2**26, "time_s": 5e-3}, "training_op_overhead_s": 6e-6,
            "optimizer": [{"tensor_numel": 2**18, "num_tensors": 4, "time_s": 4 * (2**18 * 3e-9 + 2e-5)},
                          {"tensor_numel": 4096, "num_tensors": 64, "time_s": 64 * (4096 * 3e-9 + 2e-5)}],
            "dtensor": {"dispatch_s": 4e-5, "optimizer_s_per_tensor": 1e-4}, "collectives": collectives,
            "shares": [(1, 1.0, 1.0), (2, 0.9, 0.5)], "num_cores": 2, "seconds": 0.01}


@pytest.fixture
def fake_quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """quick_measurements replaced by :func:`_fake_quick` (counting calls), no process cache, the
    cache file in this test's folder."""
    counted: list[int] = []

    def fake(**kwargs: Any) -> dict[str, Any]:
        counted.append(1)
        return _fake_quick(**kwargs)

    monkeypatch.setattr(measure, "quick_measurements", fake)
    monkeypatch.setattr(rates, "_QUICK", {})
    monkeypatch.setenv(rates.QUICK_ENV, str(tmp_path / "quick.json"))
    return counted


def test_quick_rates_are_measured_once_and_cached_on_disk(fake_quick: list[int], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    first = CpuRates.quick()
    assert first.source.startswith("quick built-in measurement (")
    assert str(tmp_path / "quick.json") in first.source
    assert " id " in first.source and "no saved `autopar calibrate` profile" in first.source
    assert "quick measurement" in caplog.text  # said once, when measured
    assert CpuRates.quick() is first and CpuRates.assumed(first.num_cores) is first  # per process
    assert first.linear_peak_flops_per_s == pytest.approx(1e11) and first.linear_tile_dim == 0.0
    assert first.optimizer_s_per_param == pytest.approx(3e-9)
    assert first.optimizer_s_per_tensor == pytest.approx(2e-5)
    assert first.runtime_microbatch_s == pytest.approx(rates.RUNTIME_MICROBATCH_OPS * 6e-6)
    assert CpuRates.quick(8).num_cores == 8  # relabelled, same measurement
    monkeypatch.setattr(rates, "_QUICK", {})  # a new process: reads the file
    assert CpuRates.quick() == first and len(fake_quick) == 1
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["format"] == rates.QUICK_FORMAT and data["key"]["torch"] == torch.__version__
    data["key"]["torch"] = "0.0"  # another torch measured it: measured again
    (tmp_path / "quick.json").write_text(json.dumps(data))
    monkeypatch.setattr(rates, "_QUICK", {})
    CpuRates.quick()
    assert len(fake_quick) == 2
    with quick_rates_as(CpuRates.placeholders(2)):
        assert CpuRates.quick().source.startswith("ASSUMED placeholders")
    assert CpuRates.quick().source.startswith("quick built-in")


def test_a_failed_quick_measurement_falls_back_to_placeholders(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    def broken(**_: Any) -> dict[str, Any]:
        raise RuntimeError("no gloo here")

    monkeypatch.setattr(measure, "quick_measurements", broken)
    monkeypatch.setattr(rates, "_QUICK", {})
    monkeypatch.setenv(rates.QUICK_ENV, str(tmp_path / "quick.json"))
    assert CpuRates.quick(2).source.startswith("ASSUMED placeholders")


def test_a_local_plan_without_a_calibration_records_the_quick_measurement(
        fake_quick: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autopar
    from autopar.cost_models import ModelProfile
    from autopar.plans.pinned import plan_from_fix

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no saved profile
    config = autopar.models.get_config("gpt", num_layers=2, hidden_size=64, num_heads=2, vocab_size=128,
                                       seq_len=32)
    local = ClusterSpec.parse("local:2")
    plans = {name: plan_from_fix("gpt", graph_fingerprint="x", num_layers=2, cluster=local, fix=fix,
                                 global_batch_size=8, seq_len=32)
             for name, fix in (("dp2", Fix(dp=2)), ("tp2", Fix(tp=2)))}
    predicted = {name: estimate(plan, ModelProfile.gpt(config, dtype="fp32")) for name, plan in plans.items()}
    for one in predicted.values():
        assert one.options is not None and one.options.local_rates == CpuRates.quick().source
        assert one.options.local_rates.startswith("quick built-in measurement")
    # measured collectives and DTensor dispatch separate the plans (the placeholders' 50 µs could not)
    assert predicted["tp2"].breakdown_dict()["tp_comm"] > 0 and len(fake_quick) == 1


def test_quick_measurement_is_time_bounded() -> None:
    start = time.perf_counter()
    raw = measure.quick_measurements(seconds=0.6, ops=rates.ELEMENTWISE_OPS, kinds=rates.COLLECTIVE_KINDS)
    assert time.perf_counter() - start < 20.0  # 0.6 s of slots, each measurement's first call, a busy CI
    quick = CpuRates.from_quick_measurements(raw, source="quick test")
    assert 1e8 < quick.linear_peak_flops_per_s < 1e13 and quick.copy_bytes_per_s > 1e8
    assert {p[1] for p in quick.collectives} == {2, 4} and quick.shares[0] == (1, 1.0, 1.0)
    assert quick.dtensor_dispatch_s > 0 and quick.collective_time_s("all_reduce", 2**20, 2) > 0
    assert not torch.distributed.is_initialized()  # the one-rank DTensor group was torn down


# --- the GPU path, on CPU tensors -----------------------------------------------------------------
def test_device_timing_and_the_gpu_profile_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert 0 < device_timed_s(lambda: torch.ones(64).sum(), seconds=0.02, device=cpu) < 0.01
    config = GpuConfig(device="cpu", seconds=1.5, progress=False, copy_bytes=2**20,
                       matmul_shapes={"bf16": ((64, 64, 64),), "fp32": ((64, 128, 64),)},
                       attention_shapes=((1, 2, 32, 16),))
    with measure.one_thread():  # as a rank runs: no thread pool to wait on
        profile, path, cluster = calibrate_gpu(out=tmp_path / "gpu.json", config=config)
    assert json.loads(path.read_text())["id"] == profile["id"]
    assert cluster is None  # "cpu" is not in the catalog: no cluster file
    kinds = {p["kind"] for p in profile["measurements"]["attention"]}
    assert kinds == {"sdpa"}  # the Triton kernel says why it cannot run on CPU tensors
    timings = profile["measurements"]["timings"]
    assert any(t["name"].startswith("attention triton") and "cannot run here" in t["result"] for t in timings)
    assert profile["measurements"]["collectives"] == [] and profile["fits"]["nccl"] is None


def test_gpu_profile_becomes_a_cluster_file_the_planner_reads(tmp_path: Path) -> None:
    """Measured H100 points (invented round numbers: a flat 700 TFLOP/s bf16) → the cluster file's
    peak, divided by the model's efficiency, makes the compute model predict the measured rate."""
    assert catalog_name("NVIDIA H100 80GB HBM3") == "H100-80GB" and catalog_name("NVIDIA RTX 4090") is None
    shapes = ((8192, 8192, 8192), (4096, 4096, 16384), (2048, 8192, 8192))
    raw = {"matmul": {"bf16": [{"m": m, "k": k, "n": n, "time_s": 2 * m * k * n / 7e14, "flops_per_s": 7e14}
                               for m, k, n in shapes]},
           "attention": [], "copy": {"bytes": 2**30, "time_s": 2**30 / 3e12},
           "collectives": [{"kind": kind, "num_ranks": 8, "size_bytes": s, "time_s": 1e-5 + s / 3e11}
                           for kind in ("all_reduce", "all_gather") for s in (2**20, 2**30)]}
    profile = build_gpu_profile(raw, device_name="NVIDIA H100 80GB HBM3", num_gpus=8, memory_bytes=80 * 2**30,
                                elapsed_s=1.0)
    path = tmp_path / "gpu-profile.json"
    cluster_file = cluster_path(path)
    cluster_file.write_text(json.dumps(profile["cluster"]))
    spec = ClusterSpec.parse(str(cluster_file))
    assert spec.device.name == "H100-SXM" and spec.num_devices == 8
    assert str(cluster_file) in spec.device.source  # the plan's cluster names the profile
    for m, k, n in shapes:
        predicted = matmul_time_s(m, k, n, device=spec.device, dtype="bf16")
        assert predicted == pytest.approx(2 * m * k * n / 7e14, rel=0.05)
    assert spec.intra_node.bandwidth_bytes_per_s == pytest.approx(
        profile["fits"]["nccl"]["bandwidth_bytes_per_s"], rel=1e-3)
