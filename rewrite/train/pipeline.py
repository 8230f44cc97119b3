"""Train the stages of the ``pipeline`` pass on ``torch.distributed.pipelining`` under ``torchrun``.

Every rank compiles the same model with the same options (the plan is deterministic for ``flops``,
``params`` and ``memory``; with ``time`` rank 0's cuts are broadcast and the others recompile with them),
keeps its own stage module(s) and builds ``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B`` /
``ScheduleInterleaved1F1B`` from them. Nothing here schedules or communicates by itself.

Model inputs: the first stage receives the inputs it reads as schedule arguments (split into
micro-batches on dim 0). The loss lives in the last stage. For Hugging Face models the loss is computed
in the graph from ``labels``: the last stage is split into a body (what it computes without ``labels``)
and a loss head (what depends on ``labels``); ``labels`` is passed as the schedule's ``target`` and the
head is the schedule's ``loss_fn`` — integer tensors are never sent between ranks (torch ≤ 2.11 cannot,
pytorch#183024). For models with a ``loss_fn(output, input)`` the single input is the target.

Gradients: ``scale_grads=True`` averages over micro-batches, so a step's gradients equal one full-batch
step of the original model (equal-sized micro-batches, mean losses). A tied parameter held by two ranks
(GPT-2's ``wte``/``lm_head``) has its gradient all-reduced (summed) between them after each step.

The command line is ``effcompile.cli.pipeline`` (``python -m effcompile.cli.pipeline --help``); e.g.::

    torchrun --nproc-per-node 2 -m effcompile.cli.pipeline hf:gpt2 --model-arg n_layer=4 \\
        --stages 2 --schedule 1f1b --microbatches 4 --batch 8 --seq 64 --steps 10
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import PipelineError
from ..graph import finalize
from ..plans import PipelinePlan
from ..program import Program

log = logging.getLogger(__name__)


@dataclass
class StageSetup:
    """One rank's part of the pipeline: its stage indices and modules, the schedule, the loss function
    and which tied parameters it must all-reduce."""

    schedule: Any
    stage_indices: list[int]
    modules: list[torch.nn.Module]
    is_first: bool
    is_last: bool
    plan: PipelinePlan
    tied_groups: list[tuple[Any, list[torch.nn.Parameter]]] = field(default_factory=list)

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's trainable parameters, each once."""
        seen: dict[int, torch.nn.Parameter] = {}
        for module in self.modules:
            for parameter in module.parameters():
                if parameter.requires_grad:
                    seen.setdefault(id(parameter), parameter)
        return list(seen.values())

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by their original names (stage modules keep the model's names)."""
        named: dict[str, torch.nn.Parameter] = {}
        for module in self.modules:
            for name, parameter in module.named_parameters():
                if parameter.requires_grad:
                    named.setdefault(name, parameter)
        return named


def retarget_devices(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """Replace device constants baked into the graph at capture (``arange(device=cpu)``) by ``device``."""

    def fix(value: Any) -> Any:
        if isinstance(value, torch.device):
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(fix(v) for v in value)
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    for node in gm.graph.nodes:
        node.args = fix(node.args)
        node.kwargs = fix(node.kwargs)
    gm.recompile()
    return gm


def split_loss_head(stage: torch.fx.GraphModule, target_names: Sequence[str], loss_index: int
                    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Split the last stage into ``body(*received)`` and ``head(*body_outputs, *targets) -> loss``.

    The head holds the nodes that depend on the target inputs (e.g. ``labels``) and lead to the loss;
    the body the remaining ancestors of the loss. Both share the stage's parameters."""
    nodes = list(stage.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    targets = [p for p in placeholders if p.name in target_names]
    output = next(n for n in nodes if n.op == "output")
    loss = output.args[0][loss_index]
    needed: set[torch.fx.Node] = set()
    stack = [loss]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    depends: set[torch.fx.Node] = set(targets)
    for node in nodes:
        if any(source in depends for source in node.all_input_nodes):
            depends.add(node)
    head_nodes = [n for n in nodes if n in needed and n in depends and n.op != "placeholder"]
    body_nodes = [n for n in nodes if n in needed and n not in depends and n.op not in ("placeholder", "output")]
    crossing = [n for n in body_nodes if any(u in head_nodes for u in n.users) and n.op != "get_attr"]
    if loss not in depends:
        crossing, head_nodes = [loss], []

    body = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for placeholder in placeholders:
        if placeholder not in targets:
            env[placeholder] = body.node_copy(placeholder)
    for node in body_nodes:
        env[node] = body.node_copy(node, lambda n: env[n])
    body.output(tuple(env[n] for n in crossing))

    head = torch.fx.Graph()
    head_env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in crossing + targets:
        head_env[node] = head.placeholder(node.name)
    for node in head_nodes:
        if node.op == "get_attr":
            head_env[node] = head.node_copy(node)
        else:
            head_env[node] = head.node_copy(node, lambda n: head_env[n] if n in head_env else head.node_copy(n))
    head.output(head_env[loss])
    body_module = finalize(torch.fx.GraphModule(stage, body, class_name="PipelineStageBody"))
    head_module = finalize(torch.fx.GraphModule(stage, head, class_name="PipelineLossHead"))
    return body_module, head_module


def pipeline_plan(program: Program) -> PipelinePlan:
    """The ``PipelinePlan`` the ``pipeline`` pass left on ``program``; PipelineError if there is none."""
    plan = program.plan(PipelinePlan)
    if plan is None:
        raise PipelineError("pipeline runtime: the program has no pipeline plan; compile it with passes=['pipeline']")
    return plan


def _flat_inputs_by_name(program: Program, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model inputs ``(args, kwargs)`` keyed by the original graph's placeholder names."""
    names = pipeline_plan(program).placeholders
    probe = Program(program.gm, args, kwargs, program.loss_fn, program.capture_path)
    return dict(zip(names, probe.flat_inputs()))


def build_stages(program: Program, rank: int, world_size: int, device: torch.device | str,
                 schedule: str | None = None, microbatches: int | None = None,
                 group: Any = None) -> StageSetup:
    """Build this rank's ``PipelineStage``(s) and the schedule from a program the ``pipeline`` pass made.

    Ranks hold one stage each (GPipe, 1F1B: ``world_size == stages``) or ``stages_per_rank`` stages
    round-robin (interleaved); ``PipelineStage`` infers shapes at the first step. Must be called on every
    rank in the same order (it creates process groups for tied parameters). Raises PipelineError when the
    plan cannot run on this world size.
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    plan = pipeline_plan(program)
    device = torch.device(device)
    schedule = schedule or plan.schedule
    microbatches = microbatches or plan.microbatches
    stages = plan.stages
    per_rank = plan.stages_per_rank if schedule == "interleaved" else 1
    if stages != world_size * per_rank:
        raise PipelineError(f"pipeline runtime: {stages} stages need {stages // per_rank} processes for schedule "
                        f"{schedule}, got {world_size}; run torchrun --nproc-per-node {stages // per_rank}")
    for index, direct in enumerate(plan.direct_inputs):
        if direct and 0 < index < stages - 1:
            raise PipelineError(f"pipeline runtime: stage {index} reads model inputs {direct} directly; "
                            "torch.distributed.pipelining feeds inputs only to the first stage (arguments) and "
                            "the last stage (target); move the cut or pass them through")
    if stages < 2:
        raise PipelineError("pipeline runtime: one stage is plain training; compile with pipeline.stages >= 2")
    last_direct = plan.target_inputs
    if len(last_direct) > 1:
        raise PipelineError(f"pipeline runtime: the last stage reads {len(last_direct)} model inputs directly "
                        f"({last_direct}); the schedule passes one target")
    indices = [rank + i * world_size for i in range(per_rank)]
    modules: list[torch.nn.Module] = []
    pipeline_stages = []
    loss_fn: Callable[..., torch.Tensor] | None = None
    for index in indices:
        module = retarget_devices(plan.modules[index], device).to(device)
        if index == stages - 1:
            module, loss_fn = _last_stage(program, plan, module, last_direct)
        modules.append(module)
        pipeline_stages.append(PipelineStage(module, index, stages, device, group=group))
    tied_groups = _tied_groups(program, plan, rank, world_size, indices, modules)
    if schedule == "interleaved":
        runner = ScheduleInterleaved1F1B(pipeline_stages, microbatches, loss_fn=_loss_or_none(loss_fn), scale_grads=True)
    else:
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        runner = kind(pipeline_stages[0], microbatches, loss_fn=_loss_or_none(loss_fn), scale_grads=True)
    return StageSetup(runner, indices, modules, 0 in indices, stages - 1 in indices, plan, tied_groups)


def _loss_or_none(loss_fn: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    # Every rank's schedule needs a loss_fn to run backward; only the last stage calls it.
    return loss_fn if loss_fn is not None else (lambda output, target: output)


def _last_stage(program: Program, plan: PipelinePlan, module: torch.fx.GraphModule,
                target_names: list[str]) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    loss_index = plan.loss_output_index
    if loss_index is not None:
        body, head = split_loss_head(module, target_names, loss_index)

        def head_loss(output: Any, target: Any = None) -> torch.Tensor:
            outputs = output if isinstance(output, tuple) else (output,)
            targets = (target,) if target_names else ()
            return head(*outputs, *targets)

        return body, head_loss
    if program.loss_fn is None:
        raise PipelineError("pipeline runtime: the model has neither a loss output nor a loss_fn; give loss_fn")
    if len(plan.placeholders) != 1:
        raise PipelineError("pipeline runtime: a model with loss_fn(output, *inputs) must take one input (the "
                        "schedule passes one target to the last stage)")
    user_loss = program.loss_fn
    spec = _output_spec(program)

    def wrapped_loss(output: Any, target: Any = None) -> torch.Tensor:
        leaves = list(output) if isinstance(output, tuple) else [output]
        return user_loss(pytree.tree_unflatten(leaves, spec), target)

    return module, wrapped_loss


def _output_spec(program: Program) -> Any:
    output = next(n for n in program.gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(output.args[0])
    if not all(isinstance(leaf, torch.fx.Node) for leaf in leaves):
        raise PipelineError("pipeline runtime: a model with loss_fn must return tensors only")
    return spec


def _tied_groups(program: Program, plan: PipelinePlan, rank: int, world_size: int, indices: list[int],
                 modules: list[torch.nn.Module]) -> list[tuple[Any, list[torch.nn.Parameter]]]:
    groups = []
    for tied in plan.tied:
        ranks = sorted({stage % world_size for stage in tied.stages})
        if len(ranks) < 2:
            continue
        group = dist.new_group(ranks) if dist.is_initialized() else None  # every rank calls new_group
        if rank in ranks:
            mine = []
            for module in modules:
                for name, parameter in module.named_parameters(remove_duplicate=False):
                    if name == tied.parameter or _same_tensor(program, tied.parameter, parameter):
                        mine.append(parameter)
            groups.append((group, list({id(p): p for p in mine}.values())))
    return groups


def _same_tensor(program: Program, name: str, parameter: torch.nn.Parameter) -> bool:
    try:
        original = program.gm.get_parameter(name)
    except AttributeError:
        return False
    return original is parameter


def step(setup: StageSetup, program: Program, args: tuple = (), kwargs: dict[str, Any] | None = None) -> float | None:
    """One training step (forward + backward of every micro-batch; gradients accumulated on this rank's
    parameters, tied ones all-reduced). Call on every rank; only the first/last stage's rank needs the
    batch. Returns the mean micro-batch loss on the last stage's rank, else None."""
    plan = setup.plan
    inputs = _flat_inputs_by_name(program, args, kwargs or {}) if (setup.is_first or setup.is_last) else {}
    first_args = [inputs[n] for n in plan.direct_inputs[0]] if setup.is_first else []
    losses: list[torch.Tensor] = []
    extra: dict[str, Any] = {}
    if setup.is_last:
        if plan.loss_output_index is not None:
            target = inputs[plan.target_inputs[0]] if plan.target_inputs else None
        else:  # loss_fn(output, input): the model's single input is the target
            target = inputs[plan.placeholders[0]]
        extra = {"target": target, "losses": losses}
    setup.schedule.step(*first_args, **extra)
    for group, parameters in setup.tied_groups:
        for parameter in parameters:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, group=group)
    if setup.is_last:
        return float(torch.stack([loss.detach().float() for loss in losses]).mean())
    return None


def broadcast_loss(loss: float | None, source: int, device: torch.device) -> float:
    """Send the last stage's loss to every rank."""
    value = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(value, src=source)
    return float(value.item())


def run_pipeline(program: Program, batches: Callable[[int], tuple[tuple, dict[str, Any]]], steps: int,
                 device: torch.device | str = "cpu", schedule: str | None = None, microbatches: int | None = None,
                 lr: float = 1e-3, optimizer: str = "adamw") -> dict[str, Any]:
    """Train ``program`` (made by the ``pipeline`` pass) for ``steps`` steps on the process group that is
    already initialised; ``batches(step) -> (args, kwargs)`` gives the full batch of each step (same on
    every rank). ``steps == 0`` runs one forward/backward without an optimiser step (for checking
    gradients). Returns per-rank results: losses, step seconds, peak memory, this rank's gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device)
    setup = build_stages(program, rank, world, device, schedule, microbatches)
    parameters = setup.parameters()
    opt = (torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(parameters, lr=lr))
    last_rank = (setup.plan.stages - 1) % world
    losses, seconds = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(max(steps, 1)):
        args, kwargs = batches(index)
        args = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, args)
        kwargs = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, kwargs)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = step(setup, program, args, kwargs)
        if steps > 0:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
        losses.append(broadcast_loss(loss, last_rank, device))
    grads = {name: p.grad.detach().float().cpu().clone() for name, p in setup.named_parameters().items()
             if p.grad is not None} if steps == 0 else {}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"rank": rank, "stages": setup.stage_indices, "losses": losses, "seconds": seconds,
            "peak_bytes": peak, "grads": grads}


def init_distributed(device_kind: str, timeout_minutes: int = 10) -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group (NCCL for ``cuda``, gloo otherwise) and pick this rank's
    device (``cuda:LOCAL_RANK``). Returns (rank, world size, device)."""
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_kind != "cuda":
        return rank, world, torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    torch.cuda.set_device(device)
    return rank, world, device
