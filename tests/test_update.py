"""The pieces every training loop shares (issue 16 part 2): one optimizer `update` (loop/update.py), one batch
order (loop/schedule.py), KTO's cross-process KL partners (loop/steps.py), and the online loop's disk check."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from dpokit import train
from dpokit.batches import TokenizedCompletion
from dpokit.batches.collate import collate_kto
from dpokit.data import builtin_path
from dpokit.loop import online
from dpokit.batches.inputs import epoch_order
from dpokit.loop.optim import build_scheduler
from dpokit.loop.schedule import BatchSchedule
from dpokit.loop.steps import NonFiniteError, kl_partners
from dpokit.loop.update import NonFiniteSteps, update


def _model_and_optimizer(lr=0.1, warmup=2):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model, optimizer, build_scheduler(optimizer, warmup, 10, "constant")


def test_update_clips_steps_and_returns_the_norm_before_clipping_and_the_lr_used():
    model, optimizer, scheduler = _model_and_optimizer()
    before = model.weight.detach().clone()
    model(torch.ones(4, 3)).pow(2).sum().backward()
    norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    grad = model.weight.grad.clone()
    done = update(model.parameters(), optimizer, scheduler, 0.5, step=1)
    assert done.grad_norm == pytest.approx(norm) and norm > 0.5
    assert done.lr == pytest.approx(0.1 / 3)  # warmup's first factor, (0 + 1) / (2 + 1): the lr of this update
    assert scheduler.get_last_lr()[0] == pytest.approx(0.2 / 3)  # the schedule moved on
    assert torch.allclose(model.weight, before - done.lr * grad * 0.5 / norm, atol=1e-6)  # clipped to norm 0.5
    assert all(p.grad is None for p in model.parameters()) and done.loss_scale is None and not done.skipped


def test_non_finite_gradients_raise_before_any_weight_moves():
    model, optimizer, scheduler = _model_and_optimizer()
    before = model.weight.detach().clone()
    (model(torch.ones(1, 3)).sum() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match=r"step 7: non-finite gradient norm on rows \['a:1'\]"):
        update(model.parameters(), optimizer, scheduler, 1.0, step=7, rows=lambda: ["a:1"])
    assert torch.equal(model.weight, before) and scheduler.get_last_lr()[0] == pytest.approx(0.1 / 3)
    handler = NonFiniteSteps("skip", log=lambda *_: None)
    assert handler.handle(NonFiniteError("x"), optimizer) == {"skipped_nonfinite": 1}
    assert all(p.grad is None for p in model.parameters())  # nothing of the step left behind
    with pytest.raises(NonFiniteError, match="^x; see the checkpoint$"):
        NonFiniteSteps("stop", print, lambda: "see the checkpoint").handle(NonFiniteError("x"), optimizer)


def test_fp16_overflow_is_skipped_by_the_scaler_and_the_scale_lowered():
    model, optimizer, scheduler = _model_and_optimizer()
    before = model.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(model(torch.ones(1, 3)).sum() * float("inf")).backward()
    done = update(model.parameters(), optimizer, scheduler, 1.0, scaler, step=1)
    assert done.skipped and done.overflow_scale == 2.0 ** 10 and done.loss_scale == 2.0 ** 9
    assert torch.equal(model.weight, before) and scheduler.get_last_lr()[0] == pytest.approx(0.1 / 3)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()  # finite now: unscaled, then applied
    done = update(model.parameters(), optimizer, scheduler, 0.0, scaler, step=2)
    assert not done.skipped and done.grad_norm == pytest.approx(math.sqrt(6 + 2)) and done.loss_scale == 2.0 ** 9
    assert not torch.equal(model.weight, before)


@pytest.mark.parametrize("n,batch_size,grad_accum", [(6, 2, 1), (7, 2, 2), (5, 4, 3), (1, 3, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_online_prompt_order_is_the_offline_schedule(n, batch_size, grad_accum, shuffle):
    """The online loop's former order (a torch.randperm seeded seed + epoch, cut into batch_size × grad_accum
    prompts per step), step for step, across epochs."""
    order = BatchSchedule(n, batch_size, grad_accum, seed=3, shuffle=shuffle)
    per_step = batch_size * grad_accum
    assert order.steps_per_epoch == math.ceil(n / per_step)
    for step in range(3 * order.steps_per_epoch):
        epoch, k = divmod(step, order.steps_per_epoch)
        perm = (torch.randperm(n, generator=torch.Generator().manual_seed(3 + epoch)).tolist() if shuffle
                else list(range(n)))
        assert order.step_rows(step) == perm[k * per_step:(k + 1) * per_step]


def test_kto_schedule_never_leaves_a_lone_last_row():
    order = BatchSchedule(9, 4, 1, seed=0, shuffle=True, no_lone_tail=True)
    assert order.steps_per_epoch == 2
    assert [len(m) for s in range(2) for m in order.micro_batches(s)] == [4, 5]
    assert sorted(order.step_rows(0) + order.step_rows(1)) == sorted(epoch_order(9, None, 0, True))
    assert BatchSchedule(9, 4, 1, seed=0, shuffle=True).steps_per_epoch == 3  # paired data keeps a last micro-batch of one


def test_kl_partners_are_the_previous_example_of_the_whole_micro_batch():
    micro = list("abcde")
    assert kl_partners(micro, 0, 1) == list("eabcd")  # one process: collate_kto's own shift
    assert kl_partners(micro, 0, 2) == list("ebd") and kl_partners(micro, 1, 2) == list("ac")  # rows a,c,e | b,d
    assert kl_partners(list("ab"), 2, 3) == ["b"]  # no row left (it repeats a with weight 0): borrows the last
    rows = [TokenizedCompletion([1, 2], [3 + i], i % 2 == 0, f"r{i}") for i in range(3)]
    alone = collate_kto(rows, 0, 16)
    assert torch.equal(alone["input_ids"], collate_kto(rows, 0, 16, kl_partners(rows, 0, 1))["input_ids"])


def test_online_run_reserves_disk_for_its_final_model_not_for_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [json.loads(line) for line in open(builtin_path("sentiment_train"),
                                                                                   encoding="utf-8")][:2])
    needs = []

    class Stop(Exception):
        pass

    real = online.check_writable

    def spy(output_dir, need_bytes, what="a checkpoint"):
        needs.append((need_bytes, what))
        real(output_dir, 0)  # makes the folder
        if need_bytes:
            raise Stop  # the start-up check is all this test needs
    monkeypatch.setattr(online, "check_writable", spy)
    with pytest.raises(Stop):
        train(model=tiny_model_dir, prompts=prompts, reward="conftest:letter_reward", loss="grpo", batch_size=2,
              output_dir=str(tmp_path / "run"), model_dtype="bf16", progress=False, log=lambda *_: None)
    from transformers import AutoModelForCausalLM
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert needs == [(0, "a checkpoint"), (int(n * 2 * 1.1), "the final model")]  # bf16 weights, +10 %
