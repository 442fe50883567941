"""Why a plan is what it is (``autopar explain plan.json [NODE_OR_MODULE]``).

Data flow: :class:`~autopar.views.model.PlanView` (plus, for one node or module,
``views.names.lookup``) → :func:`explain_plan` / :func:`explain_target` → rich renderables.
The reasons are computed, not canned: where each degree's cost lands in the predicted
breakdown, which device is closest to its memory capacity (the binding constraint of a
feasible plan), how balanced the stages are, what each stage spends communicating, and what
each recomputing stage would need without recomputation (``memory_without_recompute_bytes``,
which the cost model stores in the plan). An infeasible request has no plan file: ``autopar
plan`` reports its binding constraint as the error.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from autopar import fmt
from autopar.plans import Plan
from autopar.views.model import PlanView, StageRow, communication_s
from autopar.views.names import Match, fold, lookup
from autopar.views.text import alternatives_table, describe_config, passes_line

HEADROOM_BINDS = 0.10
STRATEGIES = {
    "colwise": "column-parallel: the weight's output features are split over the tp ranks; no communication "
               "in forward, its output stays split for the following row-parallel layer (Megatron-LM)",
    "rowwise": "row-parallel: the weight's input features are split over the tp ranks; the partial outputs "
               "are summed by one all-reduce in forward (and one in backward for the input gradient)",
    "vocab": "vocabulary-parallel embedding: the table's rows (tokens) are split over the tp ranks; one "
             "all-reduce combines the looked-up rows",
    "replicate": "replicated: every tp rank holds the whole weight and computes the whole output",
}


def _share(part: float | None, total: float | None) -> str:
    return "" if not part or not total else f" ({fmt.seconds(part)}, {100 * part / total:.1f} % of the step)"


def degree_reasons(view: PlanView) -> list[str]:
    plan, par = view.plan, view.plan.parallelism
    parts, step = plan.predicted.breakdown_dict(), plan.predicted.step_time_s
    per_node, layers = plan.cluster["devices_per_node"], plan.stages[-1].layers[1]
    link = "inside a node (fast intra-node links)" if par.tp <= per_node else "across nodes (slow links)"
    sizes = sorted({s.num_layers for s in view.stages})
    split = f"{sizes[0]} layers each" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]} layers each"
    chunks = plan.schedule.virtual_stages
    stages = f"{len(plan.stages)} stage{'s' if len(plan.stages) > 1 else ''}" + (
        f" ({chunks} chunks per pipeline rank)" if chunks > 1 else "")
    return [
        f"tp {par.tp}: no tensor parallelism" if par.tp == 1 else
        f"tp {par.tp}: each layer's matmuls split over {par.tp} devices {link}; costs tensor-parallel "
        f"{'reduce-scatters and all-gathers' if par.sequence_parallel else 'all-reduces'}"
        f"{_share(parts.get('tp_comm'), step)}",
        *_sequence_reasons(plan, parts.get("cp_comm"), step),
        f"pp {par.pp}: {layers} layers in {stages}, {split}; costs the pipeline bubble"
        f"{_share(parts.get('bubble'), step)} and sends{_share(parts.get('pp_comm'), step)}",
        f"dp {par.dp}: the remaining factor of {plan.world_size:,} devices; each replica sees "
        f"{plan.global_batch_size // par.dp} sequences per step; exposed gradient sync"
        f"{_share(parts.get('dp_comm'), step)}",
        *_expert_reason(plan, parts.get("ep_comm"), step),
        f"schedule {plan.schedule.name}: {plan.schedule.num_microbatches} microbatches of "
        f"{plan.schedule.microbatch_size} per replica"
        + (f", {plan.schedule.virtual_stages} model chunks per device"
           if plan.schedule.virtual_stages > 1 else "")
        + (f"; ZeRO stage {plan.zero} shards the optimizer state over dp" if plan.zero else ""),
    ]


def _sequence_reasons(plan: Plan, ring_s: float | None, step_s: float | None) -> list[str]:
    """The sequence-parallelism and cp lines: what each one splits and what it costs."""
    par, seq = plan.parallelism, plan.seq_len
    tokens = f"{seq:,}-token " if seq else ""
    lines = []
    if par.tp > 1:
        lines.append(
            "sequence parallelism on: the LayerNorm, dropout and residual regions are split along the "
            f"sequence over the {par.tp} tp ranks (their activations ÷ {par.tp}); each all-reduce becomes a "
            "reduce-scatter and an all-gather moving the same bytes (Korthikanti et al. 2022)"
            if par.sequence_parallel else
            "sequence parallelism off: the norm/dropout/residual activations are held whole on every tp "
            "rank (pinned off, or the training code lacks it)")
    if par.cp > 1:
        lines.append(
            f"cp {par.cp}: each {tokens}sequence split over {par.cp} ranks in {2 * par.cp} load-balanced "
            f"causal chunks (activations and compute ÷ {par.cp}); ring attention passes K/V blocks "
            f"between them, exposed transfers{_share(ring_s, step_s)}")
    else:
        lines.append(f"cp 1: every device holds whole {tokens}sequences (no context parallelism)")
    return lines


def _expert_reason(plan: Plan, all_to_all_s: float | None, step_s: float | None) -> list[str]:
    """The ep line, for plans with expert parallelism or an MoE pass (none otherwise)."""
    ep, dp = plan.parallelism.ep, plan.parallelism.dp
    if ep == 1 and not any(p.name == "moe" for p in plan.passes):
        return []
    if ep == 1:
        return [f"ep 1: every data-parallel rank holds all experts; their gradients sync over all {dp} ranks"]
    replicas = dp // ep
    sync = (f"expert gradients sync over the {replicas} ranks holding the same experts" if replicas > 1
            else "each expert lives on one rank, so its gradients need no sync")
    return [f"ep {ep}: each group of {ep} data-parallel ranks shares the experts (E/{ep} per device, "
            f"DeepSpeed-MoE); costs all-to-all dispatch and combine{_share(all_to_all_s, step_s)}; {sync}"]


def memory_reason(view: PlanView) -> str:
    if not view.memory:
        return "memory: the plan predicts none"
    worst = max(view.memory, key=lambda row: row.total_bytes)
    left = view.capacity_bytes - worst.total_bytes
    where = f"devices {fmt.id_ranges(worst.devices)} (stage {', '.join(map(str, worst.stages))})"
    used = f"{fmt.nbytes(worst.total_bytes)} of {fmt.nbytes(view.capacity_bytes)}"
    if left < HEADROOM_BINDS * view.capacity_bytes:
        return (f"memory binds: {where} use {used}, {fmt.nbytes(max(left, 0))} left — larger microbatches, "
                "less recomputation or fewer stages would not fit there")
    return f"memory does not bind: the fullest, {where}, use {used}; the choice is set by time"


def balance_reason(view: PlanView) -> str | None:
    work = [(s.times.forward_s + s.times.backward_s + s.times.backward_weight_s + s.times.recompute_s, s)
            for s in view.stages if s.times]
    if len(work) < 2:
        return None
    (slow, slowest), (fast, _) = max(work, key=lambda w: w[0]), min(work, key=lambda w: w[0])
    ends = {0: " (it also holds the embedding)", len(view.stages) - 1: " (it also holds the LM head)"}
    return (f"stage balance: the slowest stage, {slowest.index}{ends.get(slowest.index, '')}, takes "
            f"{fmt.seconds(slow)} per microbatch, the fastest {fmt.seconds(fast)} "
            f"({100 * (slow - fast) / slow:.0f} % spread" + ("" if view.exact else ", approximate") + ")")


def communication_text(stage: StageRow) -> str:
    """'tensor-parallel 1.2 ms, sends 0.3 ms' per microbatch of a stage ('' when nothing is stored)."""
    names = {"tp": "tensor-parallel", "ep": "all-to-all", "cp": "ring attention", "dp": "data-parallel",
             "p2p": "sends"}
    return ", ".join(f"{names[kind]} {fmt.seconds(value)}" for kind, value in communication_s(stage) or ())


def communication_reason(view: PlanView) -> str | None:
    """How much of the busiest stage's work per microbatch is communication (stored plans only)."""
    stored = [(s.prediction.work_s, s) for s in view.stages if s.prediction is not None]
    if not stored:
        return None
    work_s, busiest = max(stored, key=lambda pair: pair[0])
    text = communication_text(busiest)
    if not text:
        return f"communication: none inside a pipeline stage (stage {busiest.index} is the busiest)"
    return (f"communication per microbatch on the busiest stage, {busiest.index} "
            f"({fmt.seconds(work_s)} of work): {text}")


def recompute_reason(view: PlanView, stage: StageRow) -> str:
    if stage.recompute == "none":
        return f"stage {stage.index} recomputes nothing: its activations fit"
    need = None if stage.prediction is None else stage.prediction.memory_without_recompute_bytes
    if need is None:
        return (f"stage {stage.index} recomputes ({stage.recompute}): the planner's memory model needed it "
                "(the plan stores no per-stage memory: re-plan with `autopar plan` to see how much)")
    verdict = "exceeds" if need > view.capacity_bytes else "would fit in"
    return (f"stage {stage.index} recomputes ({stage.recompute}): without it its devices would need "
            f"{fmt.nbytes(need)}, which {verdict} the {fmt.nbytes(view.capacity_bytes)} capacity"
            + ("" if need > view.capacity_bytes else " — recomputation was chosen for speed elsewhere "
               "(a larger microbatch or fewer stages)"))


def sharding_table(view: PlanView) -> Table | None:
    if not view.plan.shardings:
        return None
    table = Table(title="tensor-parallel shardings (* = layer index)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("nodes", overflow="fold")
    table.add_column("strategy")
    table.add_column("layers")
    for item in fold(view.plan.shardings):
        table.add_row(Text(item.pattern), Text(item.strategy), fmt.id_ranges(item.numbers) or "—")
    return table


def _bullets(lines: list[str]) -> Text:
    return Text("\n".join(f"• {line}" for line in lines))


def explain_plan(view: PlanView) -> RenderableType:
    plan = view.plan
    config = describe_config(plan.parallelism, plan.schedule, plan.zero)
    title = Text(f"{plan.model} on {plan.cluster['text']}: {config} — predicted "
                 f"{fmt.seconds(plan.predicted.step_time_s)} per step", style="bold")
    why = [*degree_reasons(view), memory_reason(view)]
    why += [line for line in (balance_reason(view), communication_reason(view)) if line]
    why += [recompute_reason(view, s) for s in view.stages if s.recompute != "none"] or [
        "no stage recomputes" + (": every stage's activations fit" if view.memory else "")]
    used = sorted({f.strategy for f in fold(plan.shardings)})
    why += [f"{name}: {STRATEGIES[name]}" for name in used if name in STRATEGIES]
    parts: list[RenderableType] = [title, _bullets(why)]
    parts += [t for t in (sharding_table(view), alternatives_table(plan, limit=len(plan.alternatives)))
              if t is not None]
    if not plan.alternatives:
        parts.append(Text("alternatives: none recorded (a pinned plan, or the planner kept no runner-ups)"))
    parts += [passes_line(plan), Text(f"per-stage numbers: {view.source}", style="dim")]
    return Group(*parts)


def explain_target(view: PlanView, query: str) -> RenderableType:
    """Where one layer, module or graph node went, and why."""
    match: Match = lookup(view.plan, query)
    lines: list[str] = []
    stage = view.stage_of_layer(match.layer) if match.layer is not None else None
    if stage is not None:
        t = stage.times
        lines.append(f"layer {match.layer} runs in stage {stage.index} (pipeline rank {stage.rank}"
                     + (f", chunk {stage.chunk}" if view.plan.schedule.virtual_stages > 1 else "")
                     + f") with layers {stage.span}, on devices "
                     f"{fmt.id_ranges(stage.devices)}")
        comm = communication_text(stage)
        if t is not None:
            lines.append(f"per microbatch: forward {fmt.seconds(t.forward_s)}, backward "
                         f"{fmt.seconds(t.backward_s + t.backward_weight_s)}"
                         + ("" if view.exact else " (approximate)")
                         + (f"; communication: {comm}" if comm else ""))
        lines.append(recompute_reason(view, stage))
    for sharding in match.shardings:
        meaning = STRATEGIES.get(sharding.strategy, "a strategy this autopar does not describe")
        lines.append(f"{sharding.node}: {sharding.strategy} — {meaning}")
    if not match.shardings and view.plan.parallelism.tp > 1:
        lines.append("no sharding is recorded for this name: its weights (if any) are replicated over tp")
    return Group(Text(f"explain {query}", style="bold"), _bullets(lines),
                 Text(f"per-stage numbers: {view.source}", style="dim"))
