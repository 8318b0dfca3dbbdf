"""Sharded training of LLaVA-UHD (FSDP2, DeepSpeed ZeRO) on top of the transformers `Trainer` and accelerate.

What this module adds to what the `Trainer` already does:

- **FSDP units** (`fsdp_wrap_classes`): every LLM decoder layer and every vision-tower layer is its own unit (the
  tower then runs ``packing="varlen"``, each layer once per forward: see `vision_layers_as_units`), the
  resampler / projector one unit (its forward reads ``attn.out_proj.weight`` without calling ``out_proj``, and
  runs its attention once per distinct crop grid, so it must never be split), and the vision tower's remaining
  parameters (patch and position embeddings, CLIP's pre-layernorm) one more unit around the tower
  (`AdaptiveVisionEncoder`). accelerate carves the LLM's input embedding and ``lm_head`` into units of their own;
  the root keeps only the LLM's final norm, which trains exactly when the LLM does. So every unit holds only frozen
  or only trainable parameters, whatever the stage (frozen and trainable parameters sharing a unit is the known
  FSDP pitfall: all-gathers and gradient buffers sized for the whole unit); `unit_summary` lists the units and
  the tests check it.
- **Precision** (`mixed_precision_policy`): with ``--bf16`` / ``--fp16`` every unit computes in that dtype, but
  gradients are reduce-scattered in float32 (accelerate's default reduces in bf16) and the trainable
  parameters' sharded master copies stay in float32 (accelerate upcasts them). For the resampler, the part that
  learns in both stages (at lr 1e-3 in stage 1), that is the difference between averaging bf16-rounded gradients
  over ranks and averaging exact ones.
- **Through ``__call__``**: FSDP2 and ZeRO-3 gather a module's parameters around its ``__call__`` only; the model
  calls its projector (not ``projector.forward_split``, as it once did) for that reason.
- **CPU processes** (`enable_cpu_sharding`): accelerate turns FSDP on only for accelerator devices and silently
  falls back to DDP for ``--use_cpu`` (every process then holds and trains the whole model), and for DeepSpeed
  without a GPU it counts one process. On CPUs (gloo) the same FSDP2 and ZeRO code paths are switched on here, so
  the tests run what a GPU run runs.
- **Saving** (`gathered_state_dict`): the final model is gathered from the shards (collectively, on every rank)
  and written by rank 0 as a normal ``from_pretrained`` folder.
- **Sharding report** (`ShardingReport`, ``--sharding_report FILE``): one JSON line per rank with the bytes of
  parameters, gradients and optimizer state that rank holds, its peak memory and (FSDP) its units.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = ["fsdp_wrap_classes", "vision_layers_as_units", "enable_cpu_sharding", "configure_fsdp_plugin",
           "mixed_precision_policy", "prepare_zero3", "without_zero3_init", "gathered_state_dict",
           "unit_summary", "local_bytes", "ShardingReport"]


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Class names of the modules that become FSDP units (wrapped bottom-up): the LLM's decoder layers, the
    projector, the vision tower (for its embeddings: frozen, so kept out of the root) and, where each of them runs
    once per forward (`vision_layers_as_units`), the vision tower's layers. Sets the tower's packing for that."""
    from ..modeling.vision import AdaptiveVisionEncoder

    names: set[str] = set()
    tower = getattr(model, "vision_tower", None)
    if isinstance(tower, AdaptiveVisionEncoder):
        names.add(type(tower).__name__)
        if vision_layers_as_units(tower):
            names.add(type(tower.layers[0]).__name__)
    language_model = getattr(model, "language_model", None)
    if language_model is not None:
        decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is not None and len(layers):
            layer = layers[0]
            names.add(type(getattr(layer, "_checkpoint_wrapped_module", layer)).__name__)
    projector = getattr(model, "projector", None)
    if projector is not None:
        names.add(type(projector).__name__)
    if not names:  # not a LLaVA-UHD model: what it says itself
        names = set(getattr(model, "_no_split_modules", None) or ())
    return sorted(names)


def vision_layers_as_units(tower) -> bool:
    """Whether each layer of the (frozen) vision tower can be an FSDP unit, and if so switch the tower to
    ``packing="varlen"``. A unit gathers its parameters from all ranks each time it is called, so every rank must
    call it equally often; ``"bucket"`` packing (the CPU default) calls each layer once per distinct crop length in
    the rank's batch, which differs between ranks (a collective mismatch: gloo reports "Received data size doesn't
    match expected size"). ``"varlen"`` (the CUDA default) calls each layer once per forward, unless
    ``max_batch_tokens`` splits the crops. Where varlen cannot run (a tower whose layers do not pass the segments
    on, a trainable tower), the whole tower is one unit instead: gathered once per forward."""
    if tower.trainable or tower.resolve_max_batch_tokens("varlen") is not None or tower.num_layers_to_run == 0:
        return False
    packing = tower.packing
    tower.packing = "varlen"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning: we fall back ourselves
        if tower.resolve_packing() == "varlen":
            return True
    tower.packing = packing
    return False


def mixed_precision_policy(dtype: torch.dtype):
    """FSDP2's policy for ``--bf16`` / ``--fp16``: compute in ``dtype``, reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)


def configure_fsdp_plugin(plugin, model: nn.Module) -> None:
    """Our units and precision on accelerate's FSDP plugin (from ``--fsdp`` or from ``accelerate launch``), unless
    the user named the classes to wrap (``transformer_layer_cls_to_wrap``) themselves."""
    if getattr(plugin, "fsdp_version", 1) != 2:
        return
    policy = plugin.auto_wrap_policy
    name = getattr(policy, "__name__", None) or str(policy)
    if plugin.transformer_cls_names_to_wrap is None and "transformer" in name.lower():
        plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
    current = plugin.mixed_precision_policy
    dtype = getattr(current, "param_dtype", None)
    if dtype in (torch.bfloat16, torch.float16) and getattr(current, "reduce_dtype", None) == dtype:
        plugin.mixed_precision_policy = mixed_precision_policy(dtype)


def enable_cpu_sharding() -> None:
    """Let FSDP2 and DeepSpeed ZeRO run in CPU processes (gloo) as they run on GPUs; call it before the training
    arguments are parsed (they set up the process group). Idempotent; changes nothing where a GPU is used.

    - FSDP: accelerate turns FSDP on only for accelerator devices and, for ``--use_cpu``, ignores the FSDP plugin
      (every process then holds and trains the whole model, DDP-style). Here the CPU processes get accelerate's
      own FSDP set-up, the steps it takes for the devices it supports.
    - DeepSpeed (without ``--use_cpu``, which makes accelerate ignore DeepSpeed): with no GPU, accelerate starts
      DeepSpeed's process group (DeepSpeed's CPU accelerator, gloo) but then records one process, so the batch
      size and the data split come out wrong; here it records the real world size (and `_deepspeed_on_cpu_fixes`
      works around two CPU-only problems of DeepSpeed itself).
    """
    from accelerate.state import AcceleratorState, PartialState

    if getattr(AcceleratorState.__init__, "_llava_uhd", False):
        return
    accelerator_init, partial_init = AcceleratorState.__init__, PartialState.__init__

    def accelerator_state(self, *args, **kwargs):
        accelerator_init(self, *args, **kwargs)
        _fsdp_on_cpu(self, kwargs.get("fsdp_plugin"))  # from --fsdp, or built from accelerate launch's environment

    def partial_state(self, *args, **kwargs):
        if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available()
                and not getattr(self, "initialized", False)):
            _deepspeed_on_cpu_fixes()
        partial_init(self, *args, **kwargs)
        _deepspeed_world_on_cpu(self)

    accelerator_state._llava_uhd = partial_state._llava_uhd = True
    AcceleratorState.__init__, PartialState.__init__ = accelerator_state, partial_state


def _fsdp_on_cpu(state, plugin) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        if state._mixed_precision != "no":
            plugin.set_mixed_precision(state._mixed_precision)
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = state.distributed_type  # as accelerate does


def _deepspeed_world_on_cpu(state) -> None:
    from accelerate.utils import DistributedType

    if (state.distributed_type == DistributedType.DEEPSPEED and state.backend is None
            and torch.distributed.is_available() and torch.distributed.is_initialized()):
        state.backend = torch.distributed.get_backend()
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))


def _deepspeed_on_cpu_fixes() -> None:
    """Two things DeepSpeed's CPU accelerator trips on (DeepSpeed 0.19): the shared-memory all-reduce, a C++ op
    compiled on first use (minutes, and a compiler; gloo does the same without it), and ZeRO-3's ``zero_grad``,
    which calls ``grad.record_stream(None)`` on CPU tensors (``RuntimeError: unknown parameter type``; there are
    no streams to record on a CPU: the gradients are simply dropped first)."""
    import importlib
    import sys

    try:
        importlib.import_module("deepspeed.comm.torch")
        stage3 = importlib.import_module("deepspeed.runtime.zero.stage3")
    except ImportError:
        return
    # sys.modules: `import deepspeed.comm.torch as m` gives torch itself (deepspeed.comm re-exports the name torch)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    optimizer = stage3.DeepSpeedZeroOptimizer_Stage3
    if getattr(optimizer.zero_grad, "_llava_uhd", False):
        return
    zero_grad = optimizer.zero_grad

    def cpu_zero_grad(self, set_to_none=True):
        if set_to_none:
            for group in self.fp16_groups:
                for p in group:
                    p.grad = None
        return zero_grad(self, set_to_none)

    cpu_zero_grad._llava_uhd = True
    optimizer.zero_grad = cpu_zero_grad


def prepare_zero3(model: nn.Module) -> None:
    """DeepSpeed ZeRO-3 gathers a module's parameters around its ``__call__``, and every rank must gather the same
    parameters in the same order. Two parts of LLaVA-UHD do not fit that, so they are gathered whole instead:

    - the vision tower runs its layers once per distinct crop length in the batch (a number that differs between
      ranks) and reads its embeddings without calling them: it is one ZeRO-3 leaf module (all its parameters
      gathered once per forward, when the tower is called);
    - the projector runs its attention once per distinct crop grid and reads ``attn.out_proj``'s weight without
      calling it: it is a leaf module too. DeepSpeed reduces a leaf module's gradients when the gradient with
      respect to its inputs is computed; the tower's features do not need one (the tower is frozen), and then
      that moment comes before the gradients of the queries are in. So the projector's input is made to require
      a gradient (a small extra product), which puts that moment after every parameter's gradient.

    Both are small next to the LLM, whose decoder layers ZeRO-3 partitions as usual. Call before
    ``deepspeed.initialize`` (the `Trainer` does that in ``train``). The tower must run on every rank at every
    step: batches without any image on one rank and with images on another would gather different parameters."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..modeling.vision import AdaptiveVisionEncoder

    leaves = [AdaptiveVisionEncoder]
    projector = getattr(model, "projector", None)
    if projector is not None:
        leaves.append(type(projector))  # its submodules run once per distinct crop grid: not traced one by one
    set_z3_leaf_modules(model, leaves)
    if projector is not None and not getattr(projector, "_llava_uhd_zero3", False):
        projector.register_forward_pre_hook(_inputs_require_grad)
        projector._llava_uhd_zero3 = True


def _inputs_require_grad(module, args):
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and torch.is_grad_enabled() and not a.requires_grad else a for a in args)


@contextlib.contextmanager
def without_zero3_init():
    """Build modules in full on this rank alone: with ZeRO-3 enabled, transformers builds every model under
    ``deepspeed.zero.Init`` (collective: rank 0 alone would wait for the others forever)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def gathered_state_dict(trainer) -> dict | None:
    """The full state dict of a sharded model, gathered from every rank (call it on all of them); rank 0 gets it,
    the others None."""
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(model)
    return state if trainer.is_world_process_zero() else None


# ------------------------------------------------------------------------------------------ what each rank holds
def local_bytes(tensors) -> int:
    """Bytes these tensors occupy on this rank: a DTensor's local shard, a ZeRO-3 parameter's partition."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "ds_tensor"):
            t = t.ds_tensor
        if isinstance(t, DTensor):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


def _optimizer_tensors(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer, DeepSpeed's wrapper
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield value


def _deepspeed_optimizer_bytes(engine) -> int:
    """Bytes of the fp32 master partitions and the moments a DeepSpeed ZeRO optimizer keeps on this rank."""
    optimizer = getattr(engine, "optimizer", None)
    total = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        total += local_bytes(getattr(optimizer, name, None) or [])
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None:
        total += local_bytes(_optimizer_tensors(inner))
    return total


def unit_summary(model: nn.Module) -> list[dict]:
    """The FSDP2 units of ``model``: module path, class, parameter count, whether they train, mixed precision."""
    from torch.distributed.fsdp import FSDPModule

    units = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        params = [p.sharded_param for p in group.fsdp_params] if group is not None else []
        policy = group.mp_policy if group is not None else None
        units.append({
            "module": name or "<root>", "class": type(module).__name__.removeprefix("FSDP"),
            "params": sum(p.numel() for p in params),
            "trainable": sorted({bool(p.requires_grad) for p in params}),
            "param_dtype": str(getattr(policy, "param_dtype", None)),
            "reduce_dtype": str(getattr(policy, "reduce_dtype", None)),
        })
    return units


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ShardingReport(TrainerCallback):
    """``--sharding_report FILE``: at the end of training every rank appends one JSON line to FILE: its rank and
    world size, the engine (fsdp2 / deepspeed / ddp / single), the input tokens it trained on (padding excluded),
    how many parameters are DTensors, the bytes of parameters / gradients / optimizer state it holds (the most seen
    at any optimizer step, before the gradients are dropped; DeepSpeed keeps its gradients in buffers of its own,
    not counted), its peak resident memory (VmHWM), on a GPU its peak CUDA memory (allocated and reserved) and,
    for FSDP2, its units (`unit_summary`)."""

    def __init__(self, path: str, trainer):
        self.path, self.trainer = path, trainer
        self.peak = {"param_bytes": 0, "grad_bytes": 0, "optimizer_bytes": 0}

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        params = list(trainer.model.parameters())
        now = {"param_bytes": local_bytes(params), "grad_bytes": local_bytes(p.grad for p in params),
               "optimizer_bytes": local_bytes(_optimizer_tensors(trainer.optimizer))}
        if trainer.is_deepspeed_enabled:
            now["optimizer_bytes"] = _deepspeed_optimizer_bytes(trainer.model_wrapped)
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def on_train_end(self, args, state, control, **kwargs):
        from torch.distributed.tensor import DTensor

        trainer = self.trainer
        params = list(trainer.model.parameters())
        engine = ("fsdp2" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled
                  else "ddp" if args.world_size > 1 else "single")
        line = {"rank": args.process_index, "world_size": args.world_size, "engine": engine,
                "params": len(params), "dtensor_params": sum(isinstance(p, DTensor) for p in params),
                "full_param_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params),
                **self.peak, "peak_rss_bytes": _peak_rss_bytes(), "tokens": getattr(trainer, "tokens_seen", 0)}
        if torch.cuda.is_available():
            line["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
            line["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
        if trainer.is_deepspeed_enabled:
            line["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
        if trainer.is_fsdp_enabled:
            line["units"] = unit_summary(trainer.model)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())  # one write per rank: lines never interleave
        finally:
            os.close(fd)
