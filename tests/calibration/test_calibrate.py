"""Calibration: the profile file (round trip, atomic write, version and corrupt-file errors),
applying it to local clusters, the fits on synthetic data, and a shrunken real calibration
(time-bounded, with its progress lines, the emulated-dtype path and the skipped Triton kernel).
The time budget, the quick built-in measurement and the GPU path: tests/calibration/test_budget.py."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
from pathlib import Path

import pytest

from autopar import calibration as cal
from autopar.calibration.fits import (
    fit_activation_reread_s_per_byte,
    fit_alpha_beta,
    fit_linear_curve,
    fit_matmul_curve,
    fit_matmul_peak,
    ring_coefficients,
)
from autopar.calibration.ops import MIB
from autopar.cli.main import main
from autopar.cluster import ClusterSpec
from autopar.cost_models.compute import MATMUL_TILE_DIM, matmul_time_s
from autopar.cost_models.local.profile import (
    SCHEMA_VERSION,
    LinkFit,
    LocalProfile,
    ProcessShare,
    apply_profile,
    calibrated,
    default_profile_path,
    load_profile,
    save_profile,
)
from autopar.cost_models.local.rates import (
    CpuRates,
    fit_activation_reread_forward_s_per_byte,
    stack_saved_bytes,
)


def _profile(**changes: object) -> LocalProfile:
    values: dict[str, object] = dict(
        hostname="test-host", created="2026-01-01T00:00:00+00:00", num_cores=2, torch_version="2.x",
        quick=True, calibration_time_s=1.0,
        peak_flops_per_s={"fp32": 400e9, "bf16": 3e12, "fp16": 300e9},
        best_matmul_flops_per_s={"fp32": 200e9, "bf16": 1.6e12, "fp16": 190e9},
        matmul_tile_dim=2.0, matmul_curve_peak_flops_per_s=200e9, memory_bandwidth_bytes_per_s=20e9,
        elementwise_bandwidth_bytes_per_s=15e9, op_overhead_s=1e-6, attention_flops_per_s=40e9,
        optimizer_time_s_per_param=3e-9, cpu=CpuRates.placeholders(2),
        shares=(ProcessShare(num_processes=1, matmul_fraction=1.0, copy_fraction=1.0),
                ProcessShare(num_processes=2, matmul_fraction=0.9, copy_fraction=0.6),
                ProcessShare(num_processes=4, matmul_fraction=0.45, copy_fraction=0.3)),
        links=(LinkFit(num_ranks=2, bandwidth_bytes_per_s=3e9, latency_s=40e-6, rms_relative_error=0.1),
               LinkFit(num_ranks=4, bandwidth_bytes_per_s=1e9, latency_s=90e-6, rms_relative_error=0.2)),
        measurements={"collectives": [{"kind": "p2p", "num_ranks": 2, "size_bytes": 4, "time_s": 1e-5}]})
    values.update(changes)
    return LocalProfile(**values)  # type: ignore[arg-type]


def test_profile_json_round_trip(tmp_path: Path) -> None:
    profile = _profile()
    path = save_profile(profile, tmp_path / "sub" / "profile.json")
    assert path == tmp_path / "sub" / "profile.json"
    data = json.loads(path.read_text())
    assert data["format"] == "autopar-local-profile" and data["schema_version"] == SCHEMA_VERSION
    assert data["peak_flops_per_s"] == {"bf16": 3e12, "fp16": 300e9, "fp32": 400e9}
    assert load_profile(path) == profile


def test_calibration_speed_of_profiles_with_and_without_the_probe() -> None:
    assert cal.calibration_speed(_profile()) is None  # a profile from before the probe
    speed = {"environment": {"machine_speed": {"start": 30.0, "end": 40.0}}}
    assert cal.calibration_speed(_profile(measurements=speed)) == 35.0
    one = {"environment": {"machine_speed": {"start": 30.0, "end": None}}}
    assert cal.calibration_speed(_profile(measurements=one)) == 30.0


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_profile(_profile(), tmp_path / "profile.json")
    before = path.read_text()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_profile(_profile(hostname="other"), path)
    assert path.read_text() == before  # the old profile is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]  # no temporary left behind
    monkeypatch.undo()
    save_profile(_profile(hostname="other"), path)
    assert load_profile(path).hostname == "other"  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]


def test_default_path_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path().parent == tmp_path / "autopar"
    assert default_profile_path().name.startswith("profile-")
    assert load_profile() is None  # no profile yet: the placeholders stay
    with pytest.raises(ValueError, match="not found; run `autopar calibrate"):
        load_profile(tmp_path / "nope.json")
    save_profile(_profile())
    assert load_profile() == _profile()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("format"), "not an autopar local profile"),
    (lambda d: d.pop("links"), r"missing \['links'\]"),
    (lambda d: d.update(extra=1), r"unknown \['extra'\]"),
    (lambda d: d["peak_flops_per_s"].update(fp32=-1.0), r"peak_flops_per_s\[fp32\]"),
    (lambda d: d.update(links=[{"num_ranks": 2}]), "malformed"),
    (lambda d: d["cpu"].pop("shares"), r"CPU rates keys differ: unknown \[\], missing \['shares'\]"),
    (lambda d: d.update(schema_version=1), "schema_version 1 is not 2"),
])
def test_version_and_content_errors(tmp_path: Path, edit, message: str) -> None:
    data = _profile().to_dict()
    edit(data)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "autopar calibrate" in str(info.value)


@pytest.mark.parametrize("text", ["", "{not json", '{"format": "autopar-local-profile"', "[1]", "\xff\xfe"])
def test_corrupt_files_raise_one_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "profile.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="is unreadable"):
        load_profile(path)


def test_apply_profile_sets_measured_numbers() -> None:
    profile = _profile()
    for num, matmul, copy, link in ((2, 0.9, 0.6, 0), (4, 0.45, 0.3, 1)):
        before = ClusterSpec.parse(f"local:{num}")
        after = apply_profile(before, profile)
        assert before.device.placeholder and not after.device.placeholder
        assert after.device.peak_flops_per_s_for("fp32") == pytest.approx(400e9 * matmul)
        assert after.device.peak_flops_per_s_for("bf16") == pytest.approx(3e12 * matmul)
        assert after.device.memory_bandwidth_bytes_per_s == pytest.approx(20e9 * copy)
        assert after.device.memory_bytes == before.device.memory_bytes
        assert after.intra_node.bandwidth_bytes_per_s == profile.links[link].bandwidth_bytes_per_s
        assert after.intra_node.latency_s == profile.links[link].latency_s
        assert not after.intra_node.placeholder and "FITTED" in after.intra_node.source
        assert after.inter_node == before.inter_node and after.local and after.text == before.text
        assert ClusterSpec.from_dict(after.to_dict()) == after  # Plans can record it
        slow = matmul_time_s(4096, 4096, 4096, device=before.device, dtype="fp32")
        fast = matmul_time_s(4096, 4096, 4096, device=after.device, dtype="fp32")
        assert slow / fast == pytest.approx(after.device.peak_flops_per_s_for("fp32")
                                            / before.device.peak_flops_per_s_for("fp32"))


def test_apply_profile_beyond_measured_sizes_and_wrong_clusters() -> None:
    profile = _profile()
    eight = apply_profile(ClusterSpec.parse("local:8"), profile)
    assert eight.device.peak_flops_per_s_for("fp32") == pytest.approx(400e9 * 2 / 8)  # cores / N
    assert eight.intra_node.bandwidth_bytes_per_s == 1e9  # the nearest measured group, 4 ranks
    alone = apply_profile(ClusterSpec.parse("local:4"), profile, busy_processes=1)
    assert alone.device.peak_flops_per_s_for("fp32") == 400e9  # one rank computing alone
    assert alone.intra_node.bandwidth_bytes_per_s == 1e9  # the link is still the 4-rank one
    with pytest.raises(ValueError, match=r"busy_processes = 5 is invalid: expected an int in 1\.\.4"):
        apply_profile(ClusterSpec.parse("local:4"), profile, busy_processes=5)
    with pytest.raises(ValueError, match="A100-80GB devices over nccl"):
        apply_profile(ClusterSpec.parse("2x8xA100-80GB"), profile)
    gpus = ClusterSpec.parse("8xH100")
    assert calibrated(gpus, profile) is gpus


def test_calibrated_uses_the_default_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    local = ClusterSpec.parse("local:2")
    assert calibrated(local) is local
    save_profile(_profile())
    assert calibrated(local) == apply_profile(local, _profile())


def _synthetic_points(num_ranks: int, bandwidth: float, latency: float, noise: float) -> list[dict]:
    rng = random.Random(num_ranks)
    kinds = ("all_reduce", "all_gather", "reduce_scatter") + (("p2p",) if num_ranks == 2 else ())
    points = []
    for kind in kinds:
        for size in (4096, 65536, 2**20, 2**24):
            x, y = ring_coefficients(kind, num_ranks, size)
            time_s = (x / bandwidth + y * latency) * (1 + rng.uniform(-noise, noise))
            points.append({"kind": kind, "num_ranks": num_ranks, "size_bytes": size, "time_s": time_s})
    return points


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_alpha_beta_fit_recovers_known_parameters(num_ranks: int) -> None:
    exact = fit_alpha_beta(_synthetic_points(num_ranks, 2.5e9, 60e-6, 0.0))
    assert exact.bandwidth_bytes_per_s == pytest.approx(2.5e9, rel=1e-9)
    assert exact.latency_s == pytest.approx(60e-6, rel=1e-9)
    assert exact.rms_relative_error < 1e-9 and exact.num_ranks == num_ranks
    noisy = fit_alpha_beta(_synthetic_points(num_ranks, 2.5e9, 60e-6, 0.05))
    assert noisy.bandwidth_bytes_per_s == pytest.approx(2.5e9, rel=0.1)
    assert noisy.latency_s == pytest.approx(60e-6, rel=0.1)


def test_alpha_beta_fit_keeps_parameters_non_negative() -> None:
    points = [{"kind": "p2p", "num_ranks": 2, "size_bytes": s, "time_s": s / 1e9} for s in (1e3, 1e6)]
    points.append({"kind": "p2p", "num_ranks": 2, "size_bytes": 1e2, "time_s": 1e-8})  # pulls α below 0
    fit = fit_alpha_beta(points)
    assert fit.latency_s > 0 and fit.bandwidth_bytes_per_s > 0
    with pytest.raises(ValueError, match="one group size"):
        fit_alpha_beta(_synthetic_points(2, 1e9, 1e-5, 0) + _synthetic_points(4, 1e9, 1e-5, 0))


def test_matmul_fits_recover_known_curves() -> None:
    shapes = cal.transformer_shapes((256, 1024, 4096), (64, 256, 1024))

    def points(peak: float, tile: float) -> list:
        return [((m, k, n), peak / (1 + tile * (1 / m + 1 / k + 1 / n))) for m, k, n in shapes]

    assert fit_matmul_peak(points(300e9, MATMUL_TILE_DIM)) == pytest.approx(300e9)
    peak, tile = fit_matmul_curve(points(200e9, 16.0))
    assert peak == pytest.approx(200e9, rel=1e-6) and tile == pytest.approx(16.0)
    flat_peak, flat_tile = fit_matmul_curve(points(200e9, 0.0))
    assert flat_peak == pytest.approx(200e9) and flat_tile == 0.0
    # a flat measured curve seen through the model's T = 128 roll-off needs a higher peak
    assert fit_matmul_peak(points(200e9, 0.0)) > 200e9 * (1 + MATMUL_TILE_DIM * 3 / 4096)


def test_linear_fit_recovers_a_separate_rows_roll_off() -> None:
    """``nn.Linear``'s per-call cost grows with the weight: a roll-off in the rows of its own."""
    shapes = cal.CalibrationConfig.preset(quick=False).linear_shapes
    points = [((m, k, n), 100e9 / (1 + 32.0 / m + 4.0 * (1 / k + 1 / n))) for m, k, n in shapes]
    peak, tile, rows = fit_linear_curve(points)
    assert (peak, tile, rows) == pytest.approx((100e9, 4.0, 32.0), rel=1e-6)
    rates = dataclasses.replace(CpuRates.placeholders(2), linear_peak_flops_per_s=peak, linear_tile_dim=tile,
                                linear_token_tile_dim=rows)
    flops = 6 * 64 * 256 * 1024
    assert rates.linear_s(64, 256, 1024) == pytest.approx(flops / (100e9 / (1.5 + 4 * 5 / 1024)))
    older = dataclasses.replace(rates, linear_token_tile_dim=None)  # one roll-off for every dimension
    assert older.linear_s(64, 256, 1024) == pytest.approx(flops / (100e9 / (1 + 4 * 21 / 1024)))
    one_count = [((512, k, n), rate) for (m, k, n), rate in points if m == 512]
    assert fit_linear_curve(one_count)[2] is None  # rows cannot be told apart: the old fit


def test_activation_reread_fit_recovers_a_known_cost() -> None:
    shapes = ((4, 128, 128, 4), (2, 256, 512, 16), (8, 64, 256, 8))
    points = []
    for b, s, h, a in shapes:
        point = {"batch": b, "seq": s, "hidden": h, "heads": a, "time_s": 0.01 * h}
        points.append(point | {"stacked_time_s": 0.01 * h + 2e-10 * stack_saved_bytes(point)})
    assert fit_activation_reread_s_per_byte(points) == pytest.approx(2e-10)
    faster = [dict(p, stacked_time_s=p["time_s"] * 0.9) for p in points]  # never negative
    assert fit_activation_reread_s_per_byte(faster) == 0.0
    # the forward's part: the stack's forwards alone against one block's, at most the whole
    forwards = [p | {"forward_time_s": 0.004 * p["hidden"],
                     "stacked_forward_time_s": 0.004 * p["hidden"] + 0.5e-10 * stack_saved_bytes(p)}
                for p in points]
    assert fit_activation_reread_forward_s_per_byte(forwards) == pytest.approx(0.5e-10)
    assert fit_activation_reread_forward_s_per_byte(points) == 0.0  # not measured: all in the backward
    slower = [p | {"stacked_forward_time_s": p["forward_time_s"] + 1e-9 * stack_saved_bytes(p)}
              for p in forwards]
    assert fit_activation_reread_forward_s_per_byte(slower) == pytest.approx(2e-10)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_the_reread_splits_between_the_writing_forward_and_the_reading_backward(recompute: str) -> None:
    from autopar.cost_models.local.compute import transformer_layer_part
    from autopar.cost_models.local.memory import saved_layer_bytes
    from autopar.cost_models.profile import LayerProfile

    layer = LayerProfile(name="block", flops_fwd=0.0, flops_bwd=0.0, param_count=0, hidden_size=128,
                         num_heads=4, seq_len=64, ffn_size=512)
    whole = dataclasses.replace(CpuRates.placeholders(2), activation_reread_s_per_byte=4e-10)
    split = dataclasses.replace(whole, activation_reread_forward_s_per_byte=1e-10)
    a, b = (transformer_layer_part(layer, rates=r, microbatch_size=2, tp=1, bytes_per_element=4,
                                   recompute=recompute).times for r in (whole, split))
    saved = saved_layer_bytes(layer, microbatch_size=2, tp=1, fused_attention=True, bytes_per_element=4)
    moved = (b.recompute_s - a.recompute_s) if recompute == "full" else (b.forward_s - a.forward_s)
    assert moved == pytest.approx(1e-10 * saved)  # a recomputed layer's first forward saves nothing
    assert b.backward_input_s - a.backward_input_s == pytest.approx(-1e-10 * saved)
    if recompute == "full":
        assert b.forward_s == pytest.approx(a.forward_s)


def test_other_load_warning() -> None:
    def busy(single: float | None, shares: float | None) -> LocalProfile:
        return _profile(measurements={"environment": {"others_busy_cores": {"single_process": single,
                                                                            "shares": shares}}})

    assert cal.other_load_warning(_profile()) is None
    assert cal.other_load_warning(busy(0.1, None)) is None
    warning = cal.other_load_warning(busy(0.9, 0.05))
    assert warning is not None and "0.90 cores during the single process part" in warning
    assert "again on an idle machine" in warning


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="nproc = 1 is invalid"):
        cal.CalibrationConfig(nproc=1)
    with pytest.raises(ValueError, match=r"seconds = 0 is invalid: expected a time budget"):
        cal.CalibrationConfig(seconds=0)
    with pytest.raises(ValueError, match=r"emulated = \['int8'\] is invalid"):
        cal.CalibrationConfig(emulated=("int8",))
    with pytest.raises(ValueError, match="is a directory"):
        cal.calibrate(out=Path(__file__).parent, quick=True)
    assert cal.CalibrationConfig.preset(quick=False).seconds == 80.0
    assert cal.CalibrationConfig.preset(quick=True).seconds == 30.0
    assert cal.CalibrationConfig.preset(quick=True, seconds=5, emulated=["bf16"]).emulated == ("bf16",)


def _tiny_config(**changes: object) -> cal.CalibrationConfig:
    """The quick preset shrunk to shapes that take milliseconds, on 2 ranks."""
    config = dataclasses.replace(
        cal.CalibrationConfig.preset(quick=True, nproc=2),
        matmul_shapes=cal.transformer_shapes((64, 256), (64,)), low_precision_shapes=((64, 64, 64),),
        linear_shapes=cal.transformer_shapes((64, 128), (32,)), copy_bytes=4 * MIB,
        cold_pool_bytes=2 * MIB, elementwise_elements=4096, op_elements=(4096, 32768),
        cross_entropy_elements=(8192, 32768), attention_shapes=((1, 2, 32, 16),),
        math_attention_shapes=((1, 2, 32, 16),), layer_shapes=((1, 32, 64, 2),), layer_stack=2,
        optimizer_params=2**18, share_layer_shape=(1, 16, 32, 2), measure_runtime=False,
        collective_bytes=(1024, 65536), seconds=4.0)
    return dataclasses.replace(config, **changes)


def test_quick_calibration_writes_a_loadable_profile(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                                     ) -> None:
    config = _tiny_config(emulated=("bf16",))
    profile, path = cal.calibrate(out=tmp_path / "profile.json", config=config)
    assert path == tmp_path / "profile.json"
    assert load_profile(path) == profile
    assert [s.num_processes for s in profile.shares] == [1, 2] and profile.shares[0].matmul_fraction == 1.0
    assert [fit.num_ranks for fit in profile.links] == [2]
    assert set(profile.measurements["environment"]["others_busy_cores"]) == {"single_process", "shares"}
    # the machine's speed around the measurements, for later measurements to compare with
    speed = profile.measurements["environment"]["machine_speed"]
    assert set(speed) == {"start", "end"} and all(v > 0 for v in speed.values())
    assert cal.calibration_speed(profile) == pytest.approx((speed["start"] + speed["end"]) / 2)
    assert "2 ranks p2p" in profile.measurements["fits"]["links_by_kind"]
    assert len(profile.measurements["fits"]["layer_check"]) == 1
    kinds = {p["kind"] for p in profile.measurements["collectives"]}
    assert kinds == {"all_reduce", "all_gather", "reduce_scatter", "p2p"}
    assert 1e9 < profile.peak_for("fp32") < 1e13 and 1e8 < profile.memory_bandwidth_bytes_per_s < 1e12
    assert math.isfinite(profile.links[0].latency_s) and profile.links[0].latency_s < 0.1
    cpu = profile.cpu
    assert 1e9 < cpu.linear_peak_flops_per_s < 1e13 and cpu.shares[0] == (1, 1.0, 1.0)
    assert cpu.runtime_step_s == cpu.runtime_microbatch_s == 0.0  # measure_runtime=False
    assert {p[0] for p in cpu.collectives} == set(kinds) and cpu.dtensor_dispatch_s >= 0
    assert all(cpu.elementwise_s(op, 1e5)[0] > 0 for op in cpu.elementwise)
    cluster = apply_profile(ClusterSpec.parse("local:2"), profile)
    assert cluster.device.peak_flops_per_s_for("fp32") == pytest.approx(
        profile.peak_for("fp32") * profile.shares[1].matmul_fraction)
    # the emulated dtype: one warm probe, its shapes skipped, and said so
    bf16 = profile.measurements["matmul"]["bf16"]
    assert len(bf16) == 1 and bf16[0]["warm"] and "bf16" in profile.measurements["emulated"]
    # which profile priced a plan: host, time, content id, the file
    assert cpu.source.startswith("`autopar calibrate` on ") and str(path) in cpu.source
    assert f" id {cal.profile_id(profile.measurements, {})}" not in cpu.source and " id " in cpu.source
    # one progress line per measurement, each timed; the Triton kernel skipped on CPU, with the reason
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("calibrate [")]
    timings = profile.measurements["timings"]
    assert len(timings["single_process"]) > 30 and len(timings["group"]) >= 6
    assert len(lines) >= len(timings["single_process"]) + len(timings["group"])
    assert any("matmul bf16 probe" in line and "measured briefly" in line for line in lines)
    assert any("attention Triton kernel: skipped:" in line and "interpreter" in line for line in lines)
    assert all(t["seconds"] < 2.0 for t in timings["single_process"])  # a 4 s budget, in slots
    single_s = sum(t["seconds"] for t in timings["single_process"])
    assert single_s < 2 * config.seconds * config.single_fraction + 1


def _fake_group(config: cal.CalibrationConfig, **_: object) -> dict:
    """What a 2-rank group would return, without spawning it (the CLI test stays in seconds)."""
    rows = [{"num_processes": n, "matmul_flops_per_s": [1e10] * n, "copy_bytes_per_s": [1e10] * n,
             "layers_per_s": [10.0] * n, "layers_per_cpu_s": [10.0] * n} for n in (1, 2)]
    points = [{"kind": kind, "num_ranks": 2, "size_bytes": size, "time_s": 1e-4 + size / 1e9}
              for kind in ("all_reduce", "all_gather", "reduce_scatter", "p2p") for size in (1024, 65536)]
    dtensor = {"dispatch_s": 3e-5, "optimizer_s_per_tensor": 1e-4}
    return {"shares": rows, "collectives": points, "dtensor": dtensor,
            "runtime": {"num_ranks": 2, "step_s_by_microbatches": {}}, "timings": [],
            "others_busy_cores_during_shares": 0.0}


def test_cli_calibrate(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["calibrate", "--nproc", "1", "--quick", "--device", "cpu"]) == 2
    assert capfd.readouterr().err.strip().count("\n") == 0  # one line, no traceback
    assert main(["calibrate", "--seconds", "0", "--device", "cpu"]) == 2
    assert "--seconds 0 is invalid" in capfd.readouterr().err
    calls = {}
    real = cal.calibrate

    def shrunk(**kwargs: object) -> tuple[LocalProfile, Path]:
        calls.update(kwargs)
        config = _tiny_config(seconds=kwargs["seconds"], emulated=kwargs["emulated"])
        return real(out=kwargs["out"], quick=True, config=config)

    monkeypatch.setattr(cal, "calibrate", shrunk)
    module = importlib.import_module("autopar.calibration.calibrate")
    monkeypatch.setattr(module, "measure_group", _fake_group)
    out_path = tmp_path / "p.json"
    assert main(["--no-color", "calibrate", "--quick", "--device", "cpu", "--seconds", "2",
                 "--emulate", "bf16", "--emulate", "fp16", "--out", str(out_path)]) == 0
    out, err = capfd.readouterr()
    assert calls == {"out": str(out_path), "nproc": 4, "quick": True, "seconds": 2.0,
                     "emulated": ("bf16", "fp16")}
    assert "matmul fp32" in out and "gloo 2 ranks FITTED" in out and "profile written to" in out
    assert "DTensor" in out and "share with 2 busy processes" in out
    assert "machine speed probe at start / end" in out and "machine speed probe:" in err
    assert "(emulated: one warm matmul)" in out and "plans priced by it" in out
    assert "matmul fp16 probe 256³ (warm)" in err and "--emulate fp16" in err
    assert load_profile(out_path) is not None
