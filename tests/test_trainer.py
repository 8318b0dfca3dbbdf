"""`LlavaUHDTrainer` (`llava_uhd.train.trainer`): the per-epoch sample order (`EpochSampler`, on top of
`llava_uhd.data.sampler`) and the optimizer's parameter groups (``projector_lr``). The end-to-end runs are in
`test_train`."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

from llava_uhd.data.sampler import LengthGroupedSampler
from llava_uhd.train.arguments import LlavaUHDTrainingArguments
from llava_uhd.train.run import prepare_stage
from llava_uhd.train.trainer import EpochSampler, LlavaUHDTrainer

N = 53  # not a multiple of any batch or megabatch size: partial megabatches everywhere


def sample_lengths(n: int = N, mixed: bool = False) -> list[int]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (n,), generator=g).tolist()
    return [v if k % 3 else -v for k, v in enumerate(lengths)] if mixed else lengths


def batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


# ------------------------------------------------------------------------------------------ sample order
@pytest.mark.parametrize("mode", ["random", "length", "modality"])
def test_epoch_sampler_draws_a_new_permutation_every_epoch(mode):
    lengths = sample_lengths(mixed=mode == "modality")
    sampler = EpochSampler(lengths, batch_size=4, world_size=2, seed=7, mode=mode)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(N)), epoch  # every sample exactly once
        assert list(sampler) == order  # the order is a function of (seed, epoch), not of how often it was read
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 4  # each epoch its own order
    # a resumed run builds a new sampler: set to the same epoch, it replays the same order
    resumed = EpochSampler(lengths, 4, 2, seed=7, mode=mode)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
    assert list(EpochSampler(lengths, 4, 2, seed=8, mode=mode)) != orders[0]  # another seed, another order
    if mode == "length":  # the grouping holds in every epoch: each device batch of a full megabatch longest first
        for order in orders:
            for batch in batches(order[:N - N % 8], 4):
                assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    if mode == "modality":  # batches of one modality but at most one (the leftovers, at the end)
        for order in orders:
            mixed = [b for b in batches(order, 4) if len({lengths[i] > 0 for i in b}) > 1]
            assert len(mixed) <= 1


@pytest.mark.parametrize("group_by_modality", [False, True])
def test_length_grouped_sampler_draws_a_new_order_each_time_it_is_read(group_by_modality):
    """With a generator, each iteration (an epoch of a plain DataLoader) draws from it again: a new order, and
    still a permutation."""
    lengths = sample_lengths(mixed=group_by_modality)
    sampler = LengthGroupedSampler(lengths, batch_size=4, world_size=2, group_by_modality=group_by_modality,
                                   generator=torch.Generator().manual_seed(3))
    orders = [list(sampler) for _ in range(3)]
    for order in orders:
        assert sorted(order) == list(range(N))
    assert len({tuple(o) for o in orders}) == 3


# ------------------------------------------------------------------------------------------ projector_lr
BASE_LR, PROJECTOR_LR, DECAY = 1e-2, 1e-3, 0.1


def optimizer_of(tmp_path, model, **args):
    """The optimizer `LlavaUHDTrainer` builds for ``model`` after `prepare_stage` (``args``: training arguments)."""
    args = LlavaUHDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                     learning_rate=BASE_LR, weight_decay=DECAY, **args)
    model = prepare_stage(model, args)
    trainer = LlavaUHDTrainer(model=model, args=args)
    return model, trainer.create_optimizer()


def group_of(optimizer) -> dict[int, dict]:
    """id(parameter) -> its parameter group; each parameter in one group only."""
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in found, "a parameter in two groups"
            found[id(p)] = group
    return found


@pytest.mark.parametrize("setup", ["stage1", "stage2_full", "stage2_lora", "stage2_mlp"])
def test_projector_lr_goes_to_the_projector_parameters_only(tmp_path, setup):
    model, _ = build_tiny("clip", projector="mlp" if setup == "stage2_mlp" else "resampler")
    args = {"stage": 1 if setup == "stage1" else 2, "projector_lr": PROJECTOR_LR}
    if setup == "stage2_lora":
        args.update(lora=True, lora_r=4)
    model, optimizer = optimizer_of(tmp_path, model, **args)
    groups = group_of(optimizer)
    projector = {id(p) for p in model.projector.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert projector and projector <= trainable
    assert set(groups) == trainable  # every trainable parameter, nothing frozen
    for pid in trainable:
        assert groups[pid]["lr"] == (PROJECTOR_LR if pid in projector else BASE_LR)
    others = trainable - projector
    if setup == "stage1":
        assert not others  # the resampler alone learns
    else:
        assert others  # the LLM (or its LoRA adapters) learns, at the base rate
    if setup == "stage2_lora":
        lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        assert lora and lora == others
    # weight decay as the Trainer decides it (none on biases and norms), unchanged by the split
    if setup == "stage2_mlp":
        decayed, plain = model.projector.linear_1.weight, model.projector.linear_1.bias
    else:
        decayed, plain = model.projector.kv_proj.weight, model.projector.ln_q.weight
    assert (groups[id(decayed)]["weight_decay"], groups[id(plain)]["weight_decay"]) == (DECAY, 0.0)
    if setup == "stage2_full":
        llm = model.language_model
        norm, embedding = llm.model.norm.weight, llm.get_input_embeddings().weight
        assert (groups[id(embedding)]["weight_decay"], groups[id(norm)]["weight_decay"]) == (DECAY, 0.0)
        assert groups[id(embedding)]["lr"] == groups[id(norm)]["lr"] == BASE_LR


def test_without_projector_lr_everything_learns_at_the_base_rate(tmp_path):
    model, _ = build_tiny("clip")
    model, optimizer = optimizer_of(tmp_path, model, stage=2)
    assert {g["lr"] for g in optimizer.param_groups} == {BASE_LR}
    assert set(group_of(optimizer)) == {id(p) for p in model.parameters() if p.requires_grad}
