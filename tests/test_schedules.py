import functools

import lightning as L
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from asr.schedules import tri_stage


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_linear_matches_transformers_after_warmup():
    ours = lrs(tri_stage(optimizer(), total_steps=50, warmup_steps=10), 50)
    theirs = lrs(get_linear_schedule_with_warmup(optimizer(), num_warmup_steps=10, num_training_steps=50), 50)
    # transformers starts its warm-up at 0, ours at 1/warmup_steps; both peak at step 10 and reach 0 at the end.
    assert ours[10:] == pytest.approx(theirs[10:])
    assert ours[9] == pytest.approx(1.0) and ours[-1] == pytest.approx(1 / 40)


def test_tri_stage_holds_then_decays_exponentially_to_the_final_scale():
    scale = lrs(
        tri_stage(
            optimizer(), total_steps=100, warmup_steps=10, hold_fraction=0.4, final_lr_scale=0.01, decay="exponential"
        ),
        101,
    )
    assert scale[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert scale[10:50] == pytest.approx([1.0] * 40)
    assert scale[75] == pytest.approx(0.1)  # halfway through the decay: sqrt(0.01)
    assert scale[100] == pytest.approx(0.01)


def test_a_time_budget_used_up_faster_than_the_steps_moves_the_schedule_on():
    clock = {"fraction": 0.0}
    scheduler = tri_stage(
        optimizer(),
        total_steps=100,
        warmup_steps=10,
        hold_fraction=0.2,
        final_lr_scale=0.0,
        time_fraction=lambda: clock["fraction"],
    )
    assert lrs(scheduler, 20)[-1] == pytest.approx(1.0)  # step 19, no time used: still holding
    clock["fraction"] = 0.65  # the budget says step 65: halfway through the decay from step 30
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5)
    clock["fraction"] = 1.0
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_the_module_hands_the_trainers_time_budget_to_the_schedule(monkeypatch, tokenizer):
    from functools import partial

    from asr.model import SpeechRecognizer
    from tests.helpers import TINY_HUBERT

    module = SpeechRecognizer(
        tokenizer=tokenizer,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        config=TINY_HUBERT,
        scheduler=partial(tri_stage, warmup_steps=0),
    )
    monkeypatch.setattr(L.Trainer, "estimated_stepping_batches", 100)
    trainer = L.Trainer(accelerator="cpu", max_steps=100, max_time={"seconds": 60}, logger=False)
    module.trainer = trainer
    timer = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer))
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 45.0)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.get_last_lr()[0] == pytest.approx(0.25)  # 45 of 60 seconds: step 75 of 100, linear to 0


def test_without_max_time_the_schedule_follows_the_steps_only(monkeypatch, tokenizer):
    from functools import partial

    from asr.model import SpeechRecognizer
    from tests.helpers import TINY_HUBERT

    module = SpeechRecognizer(
        tokenizer=tokenizer,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        config=TINY_HUBERT,
        scheduler=partial(tri_stage, warmup_steps=4),
    )
    monkeypatch.setattr(L.Trainer, "estimated_stepping_batches", 100)
    module.trainer = L.Trainer(accelerator="cpu", max_steps=100, logger=False)
    assert module.configure_optimizers()["lr_scheduler"]["scheduler"].get_last_lr()[0] == pytest.approx(0.25)


@pytest.mark.parametrize(("decay", "final"), [("linear", 0.0), ("linear", 0.05), ("exponential", 0.01)])
def test_the_scale_stays_at_its_floor_past_the_last_step_and_past_the_time_budget(decay, final):
    """A run can take a few steps more than planned (an estimate of the steps, a resume), and the time used can pass
    the budget (trainer.max_time is checked between steps): the schedule holds at the floor."""
    schedule = functools.partial(
        tri_stage, total_steps=20, warmup_steps=2, hold_fraction=0.25, final_lr_scale=final, decay=decay
    )
    assert lrs(schedule(optimizer()), 40)[20:] == pytest.approx([final] * 20)
    clock = {"fraction": 0.0}
    scheduler = schedule(optimizer(), time_fraction=lambda: clock["fraction"])
    lrs(scheduler, 5)
    for fraction in (1.0, 1.2, 3.0):
        clock["fraction"] = fraction
        scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(final)


def test_a_schedule_it_cannot_follow_is_refused():
    with pytest.raises(ValueError, match="decay must be 'linear' or 'exponential', not 'cosine'"):
        tri_stage(optimizer(), total_steps=10, warmup_steps=1, decay="cosine")
    with pytest.raises(ValueError, match=r"exponential decay needs final_lr_scale > 0"):
        tri_stage(optimizer(), total_steps=10, warmup_steps=1, decay="exponential", final_lr_scale=0.0)
