"""Plan: validation, deterministic JSON round trip, atomic save, load errors, fingerprints."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from autopar.cluster import ClusterSpec
from autopar.plans import Plan, PlanNotFoundError, schema

GIB = 2**30


def stage_predictions() -> tuple[schema.StagePrediction, ...]:
    return (schema.StagePrediction(index=0, forward_s=0.004, backward_s=0.006, backward_weight_s=0.002,
                                   recompute_s=0.003, send_forward_s=0.0002, tp_comm_s=0.001,
                                   params_per_device=62_000_000, memory_without_recompute_bytes=40 * GIB),
            schema.StagePrediction(index=1, forward_s=0.005, backward_s=0.008, send_backward_s=0.0002,
                                   tp_comm_s=0.001, params_per_device=62_500_000.5))


def memory_predictions() -> tuple[schema.MemoryPrediction, ...]:
    return tuple(schema.MemoryPrediction(stages=(i,), weights_bytes=2 * GIB, gradients_bytes=2 * GIB,
                                         optimizer_bytes=6 * GIB, activations_bytes=19.5 * GIB,
                                         logits_bytes=0, reserve_bytes=1.5 * GIB, peak_bytes=31 * GIB)
                 for i in range(2))


def make_plan(**overrides: Any) -> Plan:
    """An 8-device pp2 × dp2 × tp2 plan with every field filled."""
    values: dict[str, Any] = dict(
        model="gpt2-small", graph_fingerprint="0123456789abcdef",
        cluster=ClusterSpec.parse("1x8xA100-80GB"), global_batch_size=32, seq_len=1024,
        parallelism=schema.Parallelism(dp=2, tp=2, pp=2),
        mesh=schema.Mesh(axis_names=("pp", "dp", "tp"), shape=(2, 2, 2), device_ids=tuple(range(8))),
        stages=(
            schema.Stage(index=0, first_node="input_ids", last_node="h_5_add_1", layers=(0, 6),
                         devices=(0, 1, 2, 3), recompute="selective"),
            schema.Stage(index=1, first_node="h_6_ln_1", last_node="output", layers=(6, 12),
                         devices=(4, 5, 6, 7)),
        ),
        shardings=(schema.Sharding(node="h_0_attn_c_attn", strategy="colwise"),
                   schema.Sharding(node="h_0_attn_c_proj", strategy="rowwise")),
        schedule=schema.Schedule(name="1f1b", microbatch_size=2, num_microbatches=8),
        zero=1,
        passes=(schema.AppliedPass(name="random_ltd", config={"keep_ratio": 0.5, "layers": [1, 11]}),
                schema.AppliedPass(name="fused_attention")),
        predicted=schema.Predicted(step_time_s=0.41, tokens_per_s=79_921.3, tflops_per_device=121.7,
                                   mfu=0.39, peak_memory_bytes=(31 * 2**30,) * 8,
                                   breakdown={"compute": 0.3, "bubble": 0.05, "tp_comm": 0.04,
                                              "dp_comm": 0.02},
                                   stages=stage_predictions(), memory=memory_predictions(), dtype="bf16",
                                   options=schema.CostOptionsUsed(dp_overlap=0.5, tp_overlap=0,
                                                                  sequence_parallel=False,
                                                                  p2p_scatter_gather=True)),
        alternatives=(schema.Alternative(parallelism=schema.Parallelism(dp=8, tp=1, pp=1),
                                         schedule=schema.Schedule(name="gpipe", microbatch_size=4,
                                                                  num_microbatches=1),
                                         predicted_step_time_s=None, reason="out of memory: 93 GiB"),),
    )
    values.update(overrides)
    return Plan(**values)


def interleaved_plan() -> Plan:
    stages = tuple(schema.Stage(index=i, first_node=f"a{i}", last_node=f"b{i}", layers=(3 * i, 3 * i + 3),
                                devices=(i % 2,), virtual_chunk=i // 2) for i in range(4))
    return Plan(model="m", graph_fingerprint="f", cluster=ClusterSpec.parse("local:2"),
                global_batch_size=8, seq_len=None, parallelism=schema.Parallelism(dp=1, tp=1, pp=2),
                mesh=schema.Mesh(axis_names=("pp",), shape=(2,), device_ids=(0, 1)), stages=stages,
                schedule=schema.Schedule(name="interleaved", microbatch_size=2, num_microbatches=4,
                                         virtual_stages=2))


@pytest.mark.parametrize("build", [make_plan, interleaved_plan])
def test_json_round_trip_is_equal_and_byte_identical(build: Any) -> None:
    plan = build()
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert build().to_json() == text  # a separately built equal plan: same bytes
    assert text.startswith('{\n  "alternatives"') and text.endswith("}\n")
    assert json.loads(text)["schema_version"] == schema.SCHEMA_VERSION


def test_normalization() -> None:
    plan = make_plan()
    assert plan.cluster == ClusterSpec.parse("1x8xA100-80GB").to_dict()
    assert plan.cluster_spec().num_devices == plan.world_size == 8
    assert plan.passes[0].config == (("keep_ratio", 0.5), ("layers", (1, 11)))
    assert plan.passes[0].config_dict() == {"keep_ratio": 0.5, "layers": (1, 11)}
    assert plan.predicted.breakdown[0] == ("bubble", 0.05)
    assert schema.Predicted(step_time_s=1).step_time_s == 1.0 and type(schema.Predicted(mfu=0).mfu) is float
    assert schema.Stage(index=0, first_node="", last_node="", layers=[0, 2], devices=[0]).layers == (0, 2)
    assert plan.created_by.startswith("autopar ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.zero = 2  # type: ignore[misc]


def test_single_device() -> None:
    plan = Plan.single_device("mlp", graph_fingerprint="abc", cluster=ClusterSpec.parse("local:1"),
                              global_batch_size=16, seq_len=128, num_layers=4)
    assert plan.world_size == 1 and plan.stages[0].layers == (0, 4)
    assert plan.schedule.microbatch_size == 16 and plan.schedule.num_microbatches == 1
    assert Plan.from_json(plan.to_json()) == plan
    from_dict = Plan.single_device("mlp", graph_fingerprint="abc", cluster=plan.cluster,
                                   global_batch_size=16, seq_len=128, num_layers=4)
    assert from_dict == plan
    with pytest.raises(ValueError, match=r"tp\(1\) × pp\(1\) × dp\(1\) = 1 ≠ world size 8"):
        Plan.single_device("mlp", graph_fingerprint="abc", cluster=ClusterSpec.parse("8xH100"),
                           global_batch_size=16)


@pytest.mark.parametrize(
    ("degrees", "world", "message"),
    [
        ({"dp": 3, "tp": 2, "pp": 2}, 8, "tp(2) × pp(2) × dp(3) = 12 ≠ world size 8"),
        ({"dp": 1, "tp": 8, "pp": 2}, 8, "tp(8) × pp(2) × dp(1) = 16 ≠ world size 8"),
        ({"dp": 2, "tp": 1, "pp": 1}, 4, "tp(1) × pp(1) × dp(2) = 2 ≠ world size 4"),
    ],
)
def test_parallelism_arithmetic(degrees: dict[str, int], world: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        schema.Parallelism(**degrees).check_world_size(world)
    assert str(info.value) == message


def test_parallelism_validation() -> None:
    schema.Parallelism(dp=2, tp=2, pp=2).check_world_size(8)
    assert schema.Parallelism(dp=4, tp=2, pp=1, ep=4).world_size == 8
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"Parallelism.tp = .* invalid: expected an int >= 1"):
            schema.Parallelism(dp=1, tp=bad, pp=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ep = 4 must divide dp = 6"):
        schema.Parallelism(dp=6, tp=1, pp=1, ep=4)
    with pytest.raises(ValueError, match=r"tp\(2\) × pp\(2\) × dp\(4\) = 16 ≠ world size 8"):
        make_plan(parallelism=schema.Parallelism(dp=4, tp=2, pp=2))


STAGE = schema.Stage(index=0, first_node="", last_node="", layers=(0, 12), devices=(0, 1, 2, 3))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"global_batch_size": 30},
         "global_batch_size(30) ≠ dp(2) × microbatch_size(2) × num_microbatches(8) = 32"),
        ({"stages": (STAGE,)}, "expected pp(2) × virtual_stages(1) = 2"),
        ({"stages": (STAGE, dataclasses.replace(STAGE, index=1, layers=(6, 12)))},
         "Plan.stages[1].layers = (6, 12) is invalid: expected to start at 12"),
        ({"stages": (STAGE, dataclasses.replace(STAGE, index=1, layers=(12, 13), devices=(4,)))},
         "dp × cp × tp = 4 device ids below 8"),
        ({"stages": (STAGE, dataclasses.replace(STAGE, layers=(12, 13)))},
         "Plan.stages[1].index = 0 is invalid: expected 1 (model order)"),
        ({"zero": 4}, "Plan.zero = 4 is invalid: expected one of [0, 1, 2, 3]"),
        ({"seq_len": 0}, "Plan.seq_len = 0 is invalid: expected an int >= 1"),
        ({"model": ""}, "Plan.model = '' is invalid: expected a nonempty str"),
        ({"schema_version": 4}, "plan schema_version 4 is not supported"),
        ({"schema_version": 1}, "a Plan in memory is version 3; Plan.load and Plan.from_json upgrade"),
        ({"mesh": schema.Mesh(axis_names=("pp", "dp", "tp"), shape=(2, 4, 1),
                                 device_ids=tuple(range(8)))},
         "Plan.mesh axis 'dp' = 4 is invalid: expected dp(2)"),
        ({"predicted": schema.Predicted(peak_memory_bytes=(1, 2))}, "8 entries, one per device"),
        ({"shardings": (schema.Sharding(node="a", strategy="x"), schema.Sharding(node="a", strategy="y"))},
         "one entry per node"),
        ({"cluster": {"num_nodes": 1}}, "Plan.cluster is invalid"),
        ({"stages": [STAGE, 3]}, "Plan.stages = [Stage("),
    ],
)
def test_plan_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        make_plan(**overrides)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: schema.Schedule(name="pipedream", microbatch_size=1, num_microbatches=1),
         "Schedule.name = 'pipedream' is invalid: expected one of ['gpipe', '1f1b'"),
        (lambda: schema.Schedule(name="1f1b", microbatch_size=1, num_microbatches=1, virtual_stages=2),
         "expected 1 for 1f1b"),
        (lambda: schema.Schedule(name="interleaved", microbatch_size=1, num_microbatches=1),
         "expected >= 2 for interleaved"),
        (lambda: schema.Mesh(axis_names=("dp",), shape=(3,), device_ids=(0, 1)), "3 distinct ids >= 0"),
        (lambda: schema.Mesh(axis_names=("dp", "dp"), shape=(1, 1), device_ids=(0,)), "distinct nonempty"),
        (lambda: schema.Stage(index=0, first_node="", last_node="", layers=(3, 2), devices=(0,)),
         "half-open range"),
        (lambda: schema.Stage(index=0, first_node="", last_node="", layers=(0, 2), devices=(0,),
                              recompute="most"), "expected one of ['none', 'selective', 'full']"),
        (lambda: schema.Predicted(breakdown={"network": 1.0}), "Predicted.breakdown['network']"),
        (lambda: schema.Predicted(step_time_s=-1.0), "expected a finite float >= 0 or None"),
        (lambda: schema.Predicted(mfu=float("nan")), "Predicted.mfu = nan is invalid"),
        (lambda: schema.Predicted(stages=stage_predictions()[1:]),
         "Predicted.stages[0].index = 1 is invalid: expected 0 (stage order)"),
        (lambda: schema.Predicted(memory=memory_predictions()[:1] * 2), "one entry per set of stages"),
        (lambda: schema.StagePrediction(index=0, forward_s=-1.0, backward_s=0, params_per_device=1),
         "StagePrediction.forward_s = -1.0 is invalid: expected a finite float >= 0"),
        (lambda: schema.StagePrediction(index=0, forward_s=1, backward_s=None, params_per_device=1),
         "StagePrediction.backward_s = None is invalid"),
        (lambda: schema.StagePrediction(index=0, forward_s=1, backward_s=1, params_per_device=1,
                                        memory_without_recompute_bytes=1.5),
         "StagePrediction.memory_without_recompute_bytes = 1.5 is invalid: expected an int >= 0"),
        (lambda: dataclasses.replace(memory_predictions()[0], stages=(1, 0)),
         "MemoryPrediction.stages = (1, 0) is invalid: expected distinct stage indices >= 0 in "
         "increasing order"),
        (lambda: dataclasses.replace(memory_predictions()[0], logits_bytes=float("inf")),
         "MemoryPrediction.logits_bytes = inf is invalid"),
        (lambda: schema.CostOptionsUsed(dp_overlap=1.5, tp_overlap=0, sequence_parallel=False,
                                        p2p_scatter_gather=True),
         "CostOptionsUsed.dp_overlap = 1.5 is invalid"),
        (lambda: schema.CostOptionsUsed(dp_overlap=0, tp_overlap=0, sequence_parallel=1,
                                        p2p_scatter_gather=True),
         "CostOptionsUsed.sequence_parallel = 1 is invalid: expected a bool"),
        (lambda: schema.Predicted(dtype=""), "Predicted.dtype = '' is invalid"),
        (lambda: schema.AppliedPass(name="moe", config={"experts": {"n": 8}}),
         "AppliedPass.config['experts'] = {'n': 8} is invalid: expected a JSON scalar"),
        (lambda: schema.Sharding(node="", strategy="colwise"), "Sharding.node = '' is invalid"),
        (lambda: schema.Alternative(parallelism=schema.Parallelism(dp=1, tp=1, pp=1),
                                    schedule=schema.Schedule(name="gpipe", microbatch_size=1,
                                                             num_microbatches=1),
                                    predicted_step_time_s=1.0, reason=""), "Alternative.reason"),
    ],
)
def test_part_validation(build: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)


def test_save_and_load(tmp_path: Path) -> None:
    plan, path = make_plan(), tmp_path / "plan.json"
    plan.save(path)
    assert path.read_bytes() == plan.to_json().encode("utf-8")
    assert Plan.load(path) == plan and Plan.load(str(path)) == plan
    assert Plan.load(path, expect_fingerprint=plan.graph_fingerprint) == plan
    assert os.listdir(tmp_path) == ["plan.json"]
    assert path.stat().st_mode & 0o777 == 0o644
    plan.save(path)  # overwriting works too
    assert os.listdir(tmp_path) == ["plan.json"]


def _fail_dump(data: Any, file: Any, **options: Any) -> None:
    file.write('{\n  "alternatives": [')  # a partial write, then the failure
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize(("target", "name", "replacement"), [
    (json, "dump", _fail_dump),
    (os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed"))),
    (os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("replace failed"))),
])
def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    target: Any, name: str, replacement: Any) -> None:
    path = tmp_path / "plan.json"
    old = make_plan(model="old")
    old.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(target, name, replacement)
    with pytest.raises((RuntimeError, OSError)):
        make_plan(model="new").save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and Plan.load(path) == old
    assert os.listdir(tmp_path) == ["plan.json"]


def test_save_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        make_plan().save(tmp_path / "nowhere" / "plan.json")


def _edited(change: Any) -> bytes:
    data = json.loads(make_plan().to_json())
    change(data)
    return json.dumps(data).encode()


GOOD = make_plan().to_json().encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "corrupt plan file"),
        (GOOD[: len(GOOD) // 2], "corrupt plan file"),
        (b"plan: yes", "corrupt plan file"),
        (b"\xff\xfe\x00garbage", "corrupt plan file"),
        (b"[1, 2]", "corrupt plan file"),
        (_edited(lambda d: d.update(schema_version=99)),
         "plan schema_version 99 is not supported; this autopar reads versions 1 to 3 (a newer autopar "
         "wrote the file: upgrade autopar to read it) — re-plan with `autopar plan`"),
        (_edited(lambda d: d.update(schema_version=0)),
         "plan schema_version 0 is not supported; this autopar reads versions 1 to 3 — re-plan"),
        (_edited(lambda d: d.update(schema_version=1)),  # version 1 had no per-stage predictions
         "plan.predicted has field(s) ['dtype', 'memory', 'options', 'stages'], which schema version 1 "
         "does not have"),
        (_edited(lambda d: d["predicted"]["stages"][0].update(forward_s="fast")),
         "plan.predicted.stages[0].forward_s should be a number, got str 'fast'"),
        (_edited(lambda d: d["predicted"]["options"].update(sequence_parallel=0)),
         "plan.predicted.options.sequence_parallel should be a bool, got int 0"),
        (_edited(lambda d: d.update(schema_version="1")),
         "plan schema_version '1' is not supported"),
        (_edited(lambda d: d.pop("schema_version")), "has no schema_version"),
        (_edited(lambda d: d.pop("schedule")), "plan is missing field(s) ['schedule']"),
        (_edited(lambda d: d.update(colour="red")), "plan has unknown field(s) ['colour']"),
        (_edited(lambda d: d["parallelism"].update(cp=2)),
         "plan: tp(2) × pp(2) × dp(2) × cp(2) = 16 ≠ world size 8"),
        (_edited(lambda d: d["parallelism"].update(sequence_parallel=True, tp=1)),
         "Parallelism.sequence_parallel = True needs tp > 1"),
        (_edited(lambda d: d.update(schema_version=2)),  # version 2 had no cp / sequence parallelism
         "plan.parallelism has field(s) ['cp', 'sequence_parallel'], which schema version 2 does not have"),
        (_edited(lambda d: d["parallelism"].update(colour=2)),
         "plan.parallelism has unknown field(s) ['colour']"),
        (_edited(lambda d: d["parallelism"].update(tp="2")),
         "plan.parallelism.tp should be an int, got str '2'"),
        (_edited(lambda d: d.update(zero=True)), "plan.zero should be an int, got bool True"),
        (_edited(lambda d: d.update(stages={})), "plan.stages should be a JSON list"),
        (_edited(lambda d: d["stages"][0].update(layers=[0])),
         "plan.stages[0].layers should be a JSON list of 2"),
        (_edited(lambda d: d["schedule"].update(name="pipedream")),
         "plan.schedule.name should be one of ['gpipe', '1f1b', 'interleaved', 'zero_bubble']"),
        (_edited(lambda d: d["predicted"].update(breakdown=[1])),
         "plan.predicted.breakdown should be a JSON object"),
        (_edited(lambda d: d["parallelism"].update(tp=0)),
         "plan.parallelism: Parallelism.tp = 0 is invalid: expected an int >= 1"),
        (_edited(lambda d: d["parallelism"].update(dp=4)),
         "tp(2) × pp(2) × dp(4) = 16 ≠ world size 8"),
        (_edited(lambda d: d["cluster"].update(num_nodes=0)), "Plan.cluster is invalid"),
    ],
)
def test_load_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        Plan.load(path)
    assert message in str(info.value)
    assert repr(str(path)) in str(info.value)


def test_from_json_errors() -> None:
    with pytest.raises(ValueError, match="corrupt plan JSON"):
        Plan.from_json("{")
    with pytest.raises(TypeError):
        Plan.from_json(b"{}")  # type: ignore[arg-type]


def test_missing_plan_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(PlanNotFoundError) as info:
        Plan.load(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert repr(str(path)) in str(info.value) and "`autopar plan`" in str(info.value)


def test_fingerprint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    make_plan().save(path)
    with pytest.raises(ValueError) as info:
        Plan.load(path, expect_fingerprint="fedcba9876543210")
    assert str(info.value) == (
        "plan was made for graph fingerprint 0123456789abcdef but the model's graph is "
        "fedcba9876543210 — the model changed; re-plan with `autopar plan`")


def _version_2_data(plan: Plan) -> dict:
    """``plan`` as autopar wrote it before schema version 3: no cp, no sequence parallelism, a
    ``pp × dp × tp`` mesh."""
    data = json.loads(plan.to_json())
    for name in ("cp", "sequence_parallel"):
        del data["parallelism"][name]
    return {**data, "schema_version": 2}


def _version_1_text(plan: Plan) -> str:
    """``plan`` as autopar wrote it before schema version 2: no per-stage predictions."""
    data = _version_2_data(plan)
    for name in ("stages", "memory", "dtype", "options"):
        del data["predicted"][name]
    return json.dumps({**data, "schema_version": 1})


def test_version_2_files_load_as_plans_without_cp(tmp_path: Path) -> None:
    plan = make_plan()
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(_version_2_data(plan)))
    old = Plan.load(path)
    assert old == plan and old.parallelism.cp == 1 and not old.sequence_parallel
    assert old.mesh.axis_names == ("pp", "dp", "tp")  # the mesh it ran on, kept as written
    assert json.loads(old.to_json())["schema_version"] == 3


def test_version_1_files_load_without_per_stage_predictions(tmp_path: Path) -> None:
    plan = make_plan()
    path = tmp_path / "old.json"
    path.write_text(_version_1_text(plan))
    old = Plan.load(path)
    assert old.schema_version == schema.SCHEMA_VERSION == 3
    assert old.predicted.stages == () and old.predicted.memory == ()
    assert old.predicted.dtype is None and old.predicted.options is None
    assert old.predicted.step_time_s == plan.predicted.step_time_s
    assert old == dataclasses.replace(plan, predicted=dataclasses.replace(
        plan.predicted, stages=(), memory=(), dtype=None, options=None))
    assert json.loads(old.to_json())["schema_version"] == 3  # saved again: the current version


def test_per_stage_predictions_round_trip() -> None:
    plan = make_plan()
    data = json.loads(plan.to_json())["predicted"]
    assert data["stages"][1]["params_per_device"] == 62_500_000.5
    assert data["memory"][0]["stages"] == [0] and data["memory"][0]["peak_bytes"] == 31 * GIB
    assert data["options"] == {"dp_overlap": 0.5, "local_rates": None, "p2p_scatter_gather": True,
                               "sequence_parallel": False, "tp_overlap": 0.0}
    again = Plan.from_json(plan.to_json())
    assert again.predicted.stages == stage_predictions() and again.predicted.dtype == "bf16"
    assert type(again.predicted.stages[0].params_per_device) is float
    assert again.predicted.memory[1].parts()["activations"] == 19.5 * GIB
    assert again.predicted.stages[0].work_s == pytest.approx(0.0152)
