"""Attach and detach the engine through diffusers' ``HookRegistry``, on instances only.

The transformer gets a step hook that reads each call's timestep and shape, starts runs, counts
steps and decides full or partial once per step; every block gets a hook that hands the call to its
block adapter. Nothing is patched on a class: ``remove_cache`` restores the original forwards.
"""

from __future__ import annotations

import inspect
import sys
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils._python_dispatch import _disable_current_modes

from .adapters import TransformerAdapter, transformer_adapter
from .budget import WHOLE_CHAIN, CacheLayout
from .config import CacheConfig, EngineSettings, resolve_configs
from .flops import record_layer_flops
from .residual import block_streams, known_streams, residual_hooks
from .state import CacheStats, CallSignature, Memo, RunState, SelectionEvent

STEP_HOOK = "ditcache.step"
BLOCK_HOOK = "ditcache.block"
CONSTANT_HOOK = "ditcache.run_constant"
TABLE_HOOK = "ditcache.step_table"
BRANCH_HOOK = "ditcache.branch"
RESIDUAL_HOOK = "ditcache.residual"
DEFAULT_PLANNED_STEPS = 50  # a budget's plan where the run's step count is unknown (per-step tables grow with it)
CALLER_SEARCH_DEPTH = 32  # frames searched for the calling pipeline's __call__ (hooks, no_grad, progress wrappers)
GROUP_OFFLOADING_HOOK = "group_offloading"  # diffusers' name for the hook that loads a group's weights
# diffusers' own caches (and its text K/V cache): stacked under ditcache they would skip or reuse the
# same work twice, so ``apply_cache`` refuses a transformer that carries one.
FOREIGN_CACHE_HOOKS = ("faster_cache", "fbc_", "mag_cache", "pyramid_attention_broadcast", "sea_cache", "taylorseer_cache", "text_kv_cache")


class StepHook(ModelHook):
    """Transformer-level hook: one call per denoising step (or per guidance stream).

    Where a denoising loop says where it is, with diffusers' ``transformer.cache_context(name,
    step_index=i, num_inference_steps=n)``, runs and steps follow it: step 0 starts a run, a name not yet
    seen at a step is another guidance stream of it, and ``n`` is the step count. Otherwise the start
    of a run is known, not guessed, when a pipeline calls: every pipeline call sets its scheduler's
    timesteps anew (a new tensor), so a call that sees another timesteps object than the run's starts a
    new run, whatever happened to the last one (a callback that raised, Ctrl-C between steps) and
    whichever way timesteps run. On a bare transformer the start is inferred: a rising timestep, or a
    finished run.

    A run belongs to the thread that started it. A call that enters while another thread's call is
    inside the transformer, or that would continue another thread's run, raises ``RuntimeError``; a
    thread whose run was taken over by another thread's new run gets that error on its next step.
    """

    _is_stateful = True

    def __init__(
        self,
        run: RunState,
        model: TransformerAdapter,
        config: CacheConfig,
        pipeline: DiffusionPipeline | None,
        branches: tuple[nn.Module, ...] = (),
    ):
        super().__init__()
        self.run = run
        self.model = model
        self.config = config
        self.branches = branches  # the generic path's branch modules: their FLOPs are counted by their hooks
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._entry = threading.Lock()
        self._taken_over: dict[int, object] = {}  # thread -> marker (or last timestep) of the run it lost
        self._refused_markers: dict[int, object] = {}  # markers set by calls refused during this run, by id
        self._converted: tuple[object, tuple[float, ...] | None] = (None, None)  # a marker and its schedule
        self.loop = StateManager(BaseState)  # diffusers sets the loop's CacheContext here (cache_context)
        self._loop_start: int | None = None  # the loop's step_index at the run's start, where the loop gives one
        self._step_names: set[str] = set()  # the context names served at this step: each is a guidance stream
        self._layouts: dict[tuple, object] = {}  # with a cache_memory budget: the layout chosen per call shape and streams

    # The bookkeeping around the forward runs outside compiled graphs (``torch.compiler.disable``): under a
    # whole-model ``torch.compile`` its Python counters would become guards that change on every call.
    def new_forward(self, module: nn.Module, *args, **kwargs):
        measuring = self._begin(module, args, kwargs)
        try:
            output = self._measure_outside(module, args, kwargs) if measuring else self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._fail()
            raise
        self._finish()
        return output

    @torch.compiler.disable
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Read the call, start or continue the run; whether this call must measure the FLOPs outside the blocks."""
        run = self.run
        call = self.model.read_call(args, kwargs)
        with self._entry:
            self._enter(module, call)
        run.arguments = call.arguments
        return run.ledger.outside_flops is None

    @torch.compiler.disable
    def _measure_outside(self, module: nn.Module, args: tuple, kwargs: dict):
        """The first call of a run, eager: its layers outside the blocks are counted once for the run."""
        run = self.run
        with record_layer_flops(module, lambda: not run.in_block, exclude=self.branches) as outside:
            output = self.fn_ref.original_forward(*args, **kwargs)
        run.ledger.outside_flops = outside[0]
        return output

    @torch.compiler.disable
    def _fail(self) -> None:
        self.run.reset()  # a failed call must not poison the next run

    @torch.compiler.disable
    def _finish(self) -> None:
        run = self.run
        run.in_call = False
        run.arguments = {}  # hold none of the call's tensors between calls
        run.end_call()

    def _enter(self, module: nn.Module, call) -> None:
        run, thread, timestep = self.run, threading.get_ident(), call.timestep
        marker = self._run_marker(module)
        if run.in_call:
            if marker is not None and marker is not run.marker:  # the refused call's pipeline set it, not the run's
                self._refused_markers[id(marker)] = marker
            raise RuntimeError(
                "a cached transformer serves one call at a time and another thread is inside it now: "
                "give each thread its own pipeline (or its own copy of the transformer)."
            )
        latents = call.latents
        signature = CallSignature(latents.shape[0], call.grid, latents.dtype, latents.device)
        position = self._loop_position()
        if position is not None:
            same_step, fresh = self._placed(position, thread)
        elif marker is not None:  # the pipeline tells where runs start
            new_marker = marker is not run.marker and id(marker) not in self._refused_markers
            same_step = run.signature is not None and not new_marker and timestep == run.plan.last_timestep
            fresh = run.signature is None or new_marker or (run.plan.run_finished and not same_step)
        else:
            same_step = run.signature is not None and timestep == run.plan.last_timestep
            fresh = run.signature is None or (not same_step and (run.plan.run_finished or self._went_back(timestep)))
        if fresh and position is None and marker is not None and self._continues_own_run(thread, timestep):
            raise RuntimeError(
                "the pipeline's scheduler set new timesteps in the middle of this thread's run (another call on the "
                "same pipeline, from another thread?), and this call continues the old run: its image would be "
                "wrong. Give each thread its own pipeline."
            )
        lost = self._taken_over.pop(thread, None)
        if lost is not None and (lost is marker if marker is not None else not fresh or timestep <= lost):
            raise RuntimeError(
                "another thread started a run on this cached transformer while this thread's run was in "
                "progress, so this run's caches are gone: give each thread its own pipeline."
            )
        if not fresh and run.owner != thread:
            raise RuntimeError(
                "this call would continue a run that another thread started on this cached transformer: "
                "give each thread its own pipeline."
            )
        if not fresh and signature != run.signature:
            if marker is not None or timestep < run.plan.last_timestep:
                previous, step = run.signature, run.plan.step + 1
                run.reset()
                raise ValueError(
                    f"batch size or resolution changed in the middle of a run (step {step}): "
                    f"batch {previous.batch} -> {signature.batch}, token grid {previous.grid} -> {signature.grid}. "
                    "Start a new run (a new pipeline call) to change them."
                )
            fresh = True
        if fresh:
            if run.signature is not None and run.owner != thread and not run.plan.run_finished:
                self._taken_over[run.owner] = run.marker if run.marker is not None else run.plan.last_timestep
            self._refused_markers.clear()
            group = self.model.sequence_group(run.settings)
            schedule, steps = self._schedule(marker), None
            if position is not None:
                self._loop_start, steps = position[1], position[2] - position[1]
                schedule = schedule if schedule is not None and len(schedule) == steps else None
            guidance_batch = self.model.is_guidance_batch(latents)
            steps = steps if steps is not None else (len(schedule) if schedule is not None else None)
            streams = 1 if guidance_batch else self._expected_streams(module)
            plan = self._layout(module, call, streams, steps)
            run.start(signature, timestep, schedule, guidance_batch, marker, thread, group, steps, plan and plan.layout)
            run.planned_streams, run.ledger.cache_budget = streams, plan.limit if plan else 0
            run.begin_step(timestep)
        elif same_step:
            run.stream += 1  # a second call at the same step, e.g. unbatched guidance
            if run.stream >= run.planned_streams and run.plan.step == 0 and run.settings.cache_memory is not None:
                self._replan(module, call)
        else:
            run.begin_step(timestep)
        run.begin_call()
        if fresh or not same_step:
            self._step_names.clear()
        if position is not None:
            self._step_names.add(position[0])
        run.call_serial += 1
        run.in_call = True

    def _expected_streams(self, module: nn.Module) -> int:
        """Guidance streams a run is expected to have (its batch not being a guidance batch): two where the calling
        pipeline runs guidance, as its ``do_classifier_free_guidance`` property (Wan, CogVideoX) or its call's
        ``do_true_cfg`` (FLUX.1, Qwen-Image with a negative prompt) says, else one. A stream more than expected
        changes the layout at the first step (``_replan``)."""
        pipeline, local = self._caller(module)
        if local.get("do_true_cfg") is True:
            return 2
        try:
            return 2 if getattr(pipeline, "do_classifier_free_guidance", False) is True else 1
        except Exception:  # noqa: BLE001 - a pipeline property reading state its call has not set
            return 1

    def _layout(self, module: nn.Module, call, streams: int, steps: int | None):
        """With a ``cache_memory`` budget, the ``LayoutPlan`` that fits this call's shapes for ``streams`` guidance
        streams (found once per shape by dry runs, ``ditcache.memory.choose_layout``); None without a budget."""
        from .memory import DryRunError, LayoutPlan, choose_layout  # the planner runs the engine itself on a fake copy

        settings = self.run.settings
        if settings.cache_memory is None or not settings.caches or settings.too_short(steps):  # nothing will be kept
            return None
        shapes = tuple((name, tuple(value.shape), value.dtype) for name, value in call.arguments.items() if isinstance(value, torch.Tensor))
        key = (shapes, streams, steps)
        if key not in self._layouts:
            arguments = {}
            for name, value in call.arguments.items():
                kind = self.model.signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif name != "self":
                    arguments[name] = value
            arguments = self.model.dry_arguments(arguments)
            try:
                with unobserved():
                    self._layouts[key] = choose_layout(module, settings, arguments, streams, steps or DEFAULT_PLANNED_STEPS,
                                                       call.latents.dtype)
            except DryRunError as error:
                smallest = CacheLayout(WHOLE_CHAIN if residual_possible(self.model, settings) else settings.cache_span,
                                       "float8", settings.forecast_order)
                warnings.warn(f"cache_memory={settings.cache_memory} cannot be planned: {error} The cache keeps the smallest "
                              f"layout at the config's forecast order ({smallest}) without a bound; pass cache_memory=None "
                              "to keep the config's own layout.", stacklevel=2)
                self._layouts[key] = LayoutPlan(smallest, 0, 0)
        return self._layouts[key]

    def _replan(self, module: nn.Module, call) -> None:
        """A guidance stream more than planned at the first step: choose for them all; where the layout changes,
        the caches kept so far are dropped and the next step is full."""
        run = self.run
        run.planned_streams = run.stream + 1
        plan = self._layout(module, call, run.planned_streams, run.plan.steps)
        run.ledger.cache_budget = plan.limit
        if plan.layout != run.layout:
            run.use_layout(plan.layout)
            run.plan.full_next_step = True

    def _loop_position(self) -> tuple[str, int, int] | None:
        """``(name, step_index, num_inference_steps)`` of the loop's ``cache_context``, where it gives both."""
        context = self.loop._context
        if context is None or context.step_index is None or context.num_inference_steps is None:
            return None
        return context.name, int(context.step_index), int(context.num_inference_steps)

    def _placed(self, position: tuple[str, int, int], thread: int) -> tuple[bool, bool]:
        """``(same_step, fresh)`` for a call at the loop's ``position``: the next stream of this step (a name not
        yet served at it), the next step of this thread's run, or else a new run."""
        name, index, count = position
        run = self.run
        ours = run.signature is not None and run.owner == thread and self._loop_start is not None
        ours = ours and count - self._loop_start == run.plan.steps
        step = index - self._loop_start if ours else None
        same_step = ours and step == run.plan.step and name not in self._step_names
        return same_step, not same_step and not (ours and step == run.plan.step + 1)

    def _continues_own_run(self, thread: int, timestep: float) -> bool:
        """Whether a call that a new marker would start a run with is the next step of the unfinished run this
        thread owns: its timestep is the one that run's schedule has next (a new run starts at its first)."""
        run = self.run
        if run.signature is None or run.owner != thread or run.plan.run_finished or run.plan.schedule is None:
            return False
        expected = run.plan.schedule[run.plan.step + 1]
        return abs(expected - timestep) <= 1e-5 * max(1.0, abs(expected))

    def _went_back(self, timestep: float) -> bool:
        """Whether the timestep moved against the run's direction (falling for most models, rising for Mochi)."""
        last = self.run.plan.last_timestep
        return timestep < last if self.model.timestep_rises else timestep > last

    def _run_marker(self, module: nn.Module) -> object | None:
        """The timesteps object of the calling pipeline's scheduler, which each pipeline call replaces; None
        without a pipeline."""
        pipeline = self._calling_pipeline(module)
        return getattr(getattr(pipeline, "scheduler", None), "timesteps", None)

    def _calling_pipeline(self, module: nn.Module) -> DiffusionPipeline | None:
        """The pipeline whose ``__call__`` is calling ``module`` now, read from the call stack: pipelines made
        with ``from_pipe(pipe, scheduler=...)`` share the transformer but not the scheduler, so the pipeline
        ``apply_cache`` was given (the fallback, for custom denoising loops) may not be the one running."""
        return self._caller(module)[0]

    def _caller(self, module: nn.Module) -> tuple[DiffusionPipeline | None, dict]:
        """The calling pipeline (see ``_calling_pipeline``) and the local variables of its ``__call__`` (empty
        where the pipeline is the fallback)."""
        frame = sys._getframe(1)
        for _ in range(CALLER_SEARCH_DEPTH):
            if frame is None:
                break
            if frame.f_code.co_name == "__call__":
                caller = frame.f_locals.get("self")
                if isinstance(caller, DiffusionPipeline) and any(
                    getattr(caller, name, None) is module for name in ("transformer", "transformer_2")
                ):
                    return caller, _read_locals(frame)
            frame = frame.f_back
        return (self._pipeline() if self._pipeline is not None else None), {}

    def _schedule(self, timesteps) -> tuple[float, ...] | None:
        """The timesteps a scheduler set (``timesteps``, the marker), in the model's units; None without any."""
        if timesteps is None or not len(timesteps):
            return None
        if self._converted[0] is not timesteps:  # converted once per marker: a host read of the whole schedule
            values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
            self._converted = (timesteps, tuple(float(t) * self.model.timestep_scale + self.model.timestep_offset for t in values))
        return self._converted[1]

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.run.reset()
        return module


_GLOBAL_MODULE_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_always_called",
                        "_global_forward_hooks_with_kwargs", "_global_backward_pre_hooks", "_global_backward_hooks")


@contextmanager
def unobserved():
    """Run work that is not the user's (a budget's dry runs on a fake copy, inside the user's first call) unseen by
    what observes the call: dispatch modes (a FLOP counter) and global module hooks (the counter's module tracker,
    which would take the copy's root for the model's own and leave it when the copy's forward ends)."""
    saved = {name: getattr(torch_module, name) for name in _GLOBAL_MODULE_HOOKS}
    for name, hooks in saved.items():
        setattr(torch_module, name, type(hooks)())
    try:
        with _disable_current_modes():
            yield
    finally:
        for name, hooks in saved.items():
            setattr(torch_module, name, hooks)


def _read_locals(frame) -> dict:
    """A copy of a running frame's locals, leaving nothing held on the frame. Before Python 3.13 ``f_locals`` is a
    dict kept on the frame, filled from its locals at each read, whose references outlive them: read at each
    transformer call, it kept the pipeline's last-step latents and predictions alive (measured: six latent-sized
    tensors). It is emptied after the copy: before 3.13 the frame's locals are written back from that dict only
    right after a Python trace function returns, and the dict is filled anew from them right before it is called."""
    local = frame.f_locals
    values = dict(local)
    if sys.version_info < (3, 13):
        local.clear()
    return values


class RunConstantHook(ModelHook):
    """A submodule outside the blocks whose output is the same on every call of a run as long as the
    tensors it is made from are (FLUX's rotary embedding from the position ids, its text projection from
    the prompt embeddings): computed once per run and guidance stream, then reused.

    ``sources(run, args, kwargs)`` gives those tensors. They are reused only while they are the same
    objects, unmodified (same ``_version``), and are held meanwhile, so that no other tensor can take
    their identity, and only while the kept output was not changed in place; anything else computes anew,
    and so does a run under ``torch.inference_mode``, whose tensors keep no version. A reused call takes its
    layers' FLOPs off the run.
    """

    def __init__(self, run: RunState, name: str, sources):
        super().__init__()
        self.run = run
        self.name = name
        self.sources = sources

    def new_forward(self, module: nn.Module, *args, **kwargs):
        run = self.run
        if not run.in_call or run.in_block or run.plan.uncached:  # a run too short to cache keeps nothing
            return self.fn_ref.original_forward(*args, **kwargs)
        sources = self.sources(run, args, kwargs)
        # inference tensors keep no version counter: under inference mode (or with inference-mode sources)
        # nothing can tell a kept output from a changed one, so the call computes anew
        if torch.is_inference_mode_enabled() or any(source is None or source.is_inference() for source in sources):
            return self.fn_ref.original_forward(*args, **kwargs)
        versions = [source._version for source in sources]
        memo = run.memo.get(self.name, run.stream)
        if (
            memo is not None
            and all(a is b for a, b in zip(memo.sources, sources, strict=True))
            and memo.versions == (*versions, *_versions(memo.value))  # nothing changed the kept output in place either
        ):
            run.ledger.add_flops(-memo.flops, 0)
            return memo.value
        with record_layer_flops(module, lambda: True) as flops:
            output = self.fn_ref.original_forward(*args, **kwargs)
        run.memo.put(self.name, run.stream, Memo(output, flops[0], tuple(sources), (*versions, *_versions(output))))
        return output


def _versions(output) -> list[int]:
    """Version counters of a tensor or of the tensors of a tuple (a rotary embedding's cos and sin)."""
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return [tensor._version for tensor in tensors if isinstance(tensor, torch.Tensor)]


class StepTableHook(ModelHook):
    """A submodule outside the blocks whose output at every step of the run was tabulated at its start
    (FLUX's timestep embedding): served from the table. ``lookup(run, compute)`` gives ``(output, FLOPs one
    call costs)``, or None off the table's schedule, and makes the table with ``compute``, the module's own
    forward, on first use: inside the transformer's forward, under the call's LoRA scale. The FLOPs stay in
    the uncached count, as a call would."""

    def __init__(self, run: RunState, lookup):
        super().__init__()
        self.run = run
        self.lookup = lookup

    def new_forward(self, module: nn.Module, *args, **kwargs):
        run = self.run
        if not run.in_call or run.in_block:
            return self.fn_ref.original_forward(*args, **kwargs)
        run.in_block = True  # the table's FLOPs are its own (added by lookup), not the call's work outside the blocks
        try:
            found = self.lookup(run, self.fn_ref.original_forward)
        finally:
            run.in_block = False
        if found is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        output, flops = found
        run.ledger.add_flops(0, flops)
        return output


class AdapterHook(ModelHook):
    """The hook on a block (its ``BlockAdapter``) or on a branch submodule of the generic path (its
    ``BranchAdapter``): runs the module through its adapter while a cached call is in progress, and as
    diffusers wrote it otherwise. FLOPs counted inside are the block's, not work outside the blocks."""

    def __init__(self, run: RunState, adapter):
        super().__init__()
        self.run = run
        self.adapter = adapter

    def new_forward(self, module: nn.Module, *args, **kwargs):
        run = self.run
        if not run.in_call or run.spans is not None:  # a residual layout runs the block as diffusers wrote it
            return self.fn_ref.original_forward(*args, **kwargs)
        was_in_block, run.in_block = run.in_block, True
        try:
            return self.adapter.run_hooked(run, self.fn_ref.original_forward, args, kwargs)
        finally:
            run.in_block = was_in_block


def _split_target(target) -> tuple[list[nn.Module], DiffusionPipeline | None]:
    """The transformers ``target`` runs (a pipeline's ``transformer``, and its ``transformer_2`` where it has
    one, as Wan 2.2's two experts: the first takes the high-noise steps, the second the rest), and the pipeline."""
    if isinstance(target, DiffusionPipeline):
        transformers = [getattr(target, name, None) for name in ("transformer", "transformer_2")]
        transformers = [module for module in transformers if isinstance(module, nn.Module)]
        if not transformers:
            raise TypeError(f"{type(target).__name__} has no `transformer` component; ditcache caches transformers.")
        for module in transformers:
            _refuse_compiled(module)
        return transformers, target
    if isinstance(target, nn.Module):
        _refuse_compiled(target)
        return [target], None
    raise TypeError(f"apply_cache expects a diffusers pipeline or a transformer model, got {type(target).__name__}.")


def _refuse_compiled(module: nn.Module) -> None:
    """A transformer compiled as a whole before caching: its graphs were traced without ditcache's hooks."""
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            f"the transformer is compiled ({type(module._orig_mod).__name__} inside torch.compile's OptimizedModule): "
            "apply ditcache before compiling, e.g. pipe.transformer = pipe.transformer._orig_mod; "
            "ditcache.apply_cache(pipe, config); pipe.transformer = torch.compile(pipe.transformer), or compile the "
            "blocks instead (regional compilation), after apply_cache."
        )


def _step_hook(transformer: nn.Module) -> StepHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(STEP_HOOK) if registry is not None else None


def apply_cache(target, config: CacheConfig | list[CacheConfig]):
    """Cache ``target`` (a pipeline, whose ``transformer`` is used, or a transformer) with ``config``: a
    ``ToCaConfig``, ``FORAConfig`` or ``ToMeConfig``, or a list of a caching config and a ``ToMeConfig``
    (merging then runs on the branches that full steps compute).

    Applying again replaces the previous configuration. Returns ``target``.
    """
    transformers, pipeline = _split_target(target)
    for transformer in transformers:
        _refuse_foreign_caches(transformer)
    prepared = []
    for transformer in transformers:  # every setting is checked before anything is attached
        model = transformer_adapter(transformer)
        settings = resolve_configs(config, model.family)
        model.sequence_group(settings)  # refuses what context parallelism cannot serve, when it is already on
        residual_possible(model, settings)  # refuses a residual layout on blocks whose streams are not known
        prepared.append((transformer, model, settings, model.block_adapters(settings), model.branch_adapters(settings)))
    for _, _, _, adapters, _ in prepared:
        _refuse_block_offloading_beneath(adapters)
    for transformer, model, settings, adapters, branch_adapters in prepared:
        remove_cache(transformer)
        attach(transformer, model, settings, config, pipeline, adapters, branch_adapters)
    return target


def attach(transformer: nn.Module, model, settings: EngineSettings, config, pipeline, adapters: list, branch_adapters: list) -> RunState:
    """Register the engine's hooks on ``transformer`` (checked and prepared by ``apply_cache``); its run state."""
    run = RunState(settings)
    step_hook = StepHook(run, model, config, pipeline, tuple(adapter.module for adapter in branch_adapters))
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(step_hook, STEP_HOOK)
    for adapter in adapters:
        HookRegistry.check_if_exists_or_initialize(adapter.block).register_hook(AdapterHook(run, adapter), BLOCK_HOOK)
    for adapter in branch_adapters:
        HookRegistry.check_if_exists_or_initialize(adapter.module).register_hook(AdapterHook(run, adapter), BRANCH_HOOK)
    if residual_possible(model, settings):  # registered last: outermost on the block
        for block, hook in residual_hooks(run, model.blocks()):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, RESIDUAL_HOOK)
    for name, (module, sources) in model.run_constants().items():
        HookRegistry.check_if_exists_or_initialize(module).register_hook(RunConstantHook(run, name, sources), CONSTANT_HOOK)
    for module, lookup in model.step_tables().values():
        HookRegistry.check_if_exists_or_initialize(module).register_hook(StepTableHook(run, lookup), TABLE_HOOK)
    transformer._diffusers_hook.invalidate_child_registries_cache()
    return run


def residual_possible(model: TransformerAdapter, settings: EngineSettings) -> bool:
    """Whether runs may keep residuals: asked for by the config, or open to its budget where every block's
    streams are known. A config asking for one on a model whose blocks are not known is refused."""
    if settings.cache_span:
        known_streams(model.blocks())  # raises, naming the block, where one is not known
        return True
    return settings.cache_memory is not None and settings.residual_allowed and all(
        block_streams(block) is not None for _, block in model.blocks())


def _refuse_block_offloading_beneath(adapters: list) -> None:
    """A block adapter computes its block from the block's submodules, so a group-offloading hook on the
    block itself, registered before ditcache's (and so run inside it), would never load the block's weights."""
    for adapter in adapters:
        registry = getattr(adapter.block, "_diffusers_hook", None)
        if registry is not None and GROUP_OFFLOADING_HOOK in registry.hooks:
            raise RuntimeError(
                f"{adapter.name} carries block-level group offloading applied before ditcache: ditcache computes that "
                "block from its submodules and would skip the hook that loads its weights. Apply the cache first, "
                "then the offloading: remove it (or reload the model), call ditcache.apply_cache(...), then "
                "apply_group_offloading(...) / enable_group_offload(...). Leaf-level offloading works in either order."
            )


def _refuse_foreign_caches(transformer: nn.Module) -> None:
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks if registry is not None else ():
            if hook.startswith(FOREIGN_CACHE_HOOKS):
                raise RuntimeError(
                    f"the transformer already carries diffusers' cache hook {hook!r} (on {name or 'the transformer'}): "
                    "ditcache would cache on top of it. Remove it first (transformer.disable_cache(), or remove that "
                    "hook), or compare the two caches on separate runs."
                )


def remove_cache(target):
    """Detach ditcache from ``target``; the model then runs its original forwards. Returns ``target``."""
    for transformer in _split_target(target)[0]:
        if _step_hook(transformer) is None:
            continue
        transformer._diffusers_hook.remove_hook(STEP_HOOK, recurse=False)
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for name in (BLOCK_HOOK, CONSTANT_HOOK, TABLE_HOOK, BRANCH_HOOK, RESIDUAL_HOOK):
                registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                drop_empty_registry(module)
        if hasattr(transformer, "_diffusers_hook"):
            transformer._diffusers_hook.invalidate_child_registries_cache()
    return target


def drop_empty_registry(module: nn.Module) -> None:
    """Leave a module as it was before any hook: no registry, no instance-level ``forward``."""
    del module._diffusers_hook
    if module.__dict__.get("forward") == type(module).forward.__get__(module):
        del module.forward


def cache_config(target) -> CacheConfig | list[CacheConfig] | None:
    """The config ``target`` is cached with, or None."""
    hook = _step_hook(_split_target(target)[0][0])
    return hook.config if hook is not None else None


def cache_stats(target) -> CacheStats:
    """Statistics of the last run of ``target``'s transformer (the run in progress, if one is); of both
    experts' parts of it where a pipeline has two (Wan 2.2), their steps counted in the order they ran."""
    hooks = [_step_hook(transformer) for transformer in _split_target(target)[0]]
    if hooks[0] is None:
        raise RuntimeError("ditcache is not applied to this model; call ditcache.apply_cache first.")
    runs = sorted((hook.run for hook in hooks if hook is not None and hook.run.completed_stats is not None), key=lambda run: run.started)
    if not runs:
        raise RuntimeError("the cached model has not run yet; cache_stats describes a completed run.")
    latest = runs[-1]  # an expert the last pipeline call did not use holds an older call's run: left out
    parts = [run for run in runs if run is latest or (run.completed_marker is not None and run.completed_marker is latest.completed_marker)]
    return CacheStats.joined([_with_every_error(run) for run in parts])


def _with_every_error(run: RunState) -> CacheStats:
    """A run's stats with every measured error read (a run on a bare transformer has no known end, where a
    pipeline's run reads them all on its last step)."""
    stats = run.completed_stats
    if run.plan.meter is None or not stats.forecast_errors:
        return stats
    return replace(stats, forecast_errors=run.plan.meter.errors(stats.steps, wait=True))


@contextmanager
def record_selections(target) -> Iterator[list[SelectionEvent]]:
    """Record, while the ``with`` body runs, which tokens each partial step recomputes and the score
    terms that chose them: ``with record_selections(pipe) as events: pipe(...)``. Off otherwise, at
    no cost."""
    hook = _step_hook(_split_target(target)[0][0])
    if hook is None:
        raise RuntimeError("ditcache is not applied to this model; call ditcache.apply_cache first.")
    events: list[SelectionEvent] = []
    hook.run.recorder = events
    try:
        yield events
    finally:
        hook.run.recorder = None
