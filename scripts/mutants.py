"""Hand-written mutants: one realistic bug each in a core behaviour, applied to a copy of the working tree, and the
tests that must catch it. ``python scripts/mutants.py [name ...]`` prints each mutant killed or survived; the exit
status is 1 if one survived. (mutmut covers the small pure modules: docs/developing.md, "Mutation testing".)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


LOSS = "tests/test_loss_normalization.py"
FAST_LOSS = f"{LOSS}::test_the_loss_is_the_ctc_sum_over_the_token_count"
MUTANTS = [
    Mutant(
        "schedule scale below its floor past the end",
        "asr/schedules.py",
        "progress = min(1.0, (step - hold_end) / decay_steps)",
        "progress = (step - hold_end) / decay_steps",
        ("tests/test_schedules.py",),
    ),
    Mutant(
        "one HTTP retry fewer",
        "asr/data/remote.py",
        "for k in range(self.RETRIES + 1):",
        "for k in range(self.RETRIES):",
        ("tests/test_remote.py",),
    ),
    Mutant(
        "CTC loss over utterances, not tokens",
        "asr/model.py",
        'return self.ctc_sum(logits, lengths, batch) / batch["label_lengths"].sum()',
        'return self.ctc_sum(logits, lengths, batch) / len(batch["ids"])',
        (FAST_LOSS,),
    ),
    Mutant(
        "CTC with PyTorch's mean reduction",
        "asr/model.py",
        'reduction="sum",\n            zero_infinity=True,',
        'reduction="mean",\n            zero_infinity=True,',
        (FAST_LOSS,),
    ),
    Mutant(
        "CTC on logits, not log-probabilities",
        "asr/model.py",
        "log_probs = logits.float().log_softmax(-1).transpose(0, 1)",
        "log_probs = logits.float().transpose(0, 1)",
        (FAST_LOSS,),
    ),
    Mutant(
        "infeasible utterances not zeroed",
        "asr/model.py",
        'reduction="sum",\n            zero_infinity=True,',
        'reduction="sum",\n            zero_infinity=False,',
        (FAST_LOSS,),
    ),
    Mutant(
        "step gradient not undoing DDP's mean and Lightning's accumulation division",
        "asr/model.py",
        "factor = trainer.world_size * trainer.accumulate_grad_batches * self._normaliser / total",
        "factor = self._normaliser / total",
        (LOSS,),
    ),
    Mutant(
        "step tokens of this rank only",
        "asr/model.py",
        "total = self._sum_over_ranks(self._step_tokens.float()).clamp(min=1)",
        "total = self._step_tokens.float().clamp(min=1)",
        (LOSS,),
    ),
    Mutant(
        "non-finite step not skipped",
        "asr/model.py",
        'if not finite and getattr(self.trainer.precision_plugin, "scaler", None) is None:',
        "if False:",
        ("tests/test_nonfinite.py",),
    ),
    Mutant(
        "non-finite steps stop one too late",
        "asr/model.py",
        "if self.nonfinite_in_a_row >= limit:",
        "if self.nonfinite_in_a_row > limit:",
        ("tests/test_nonfinite.py",),
    ),
    Mutant(
        "non-finite streak never reset",
        "asr/model.py",
        "            self.nonfinite_in_a_row = 0\n        else:",
        "            pass\n        else:",
        ("tests/test_nonfinite.py",),
    ),
    Mutant(
        "out-of-memory in evaluation names the training settings",
        "asr/model.py",
        'prefix = "data." if stage == "training" else "data.eval_"',
        'prefix = "data."',
        ("tests/test_model.py::test_out_of_memory_in_evaluation_names_the_batch_and_the_eval_settings",),
    ),
    Mutant(
        "blank is not the pad token",
        "asr/data/text.py",
        "self.pad_id = self.token_to_id[PAD]",
        "self.pad_id = self.token_to_id[BOS]",
        ("tests/test_text.py",),
    ),
    Mutant(
        "a batch by seconds may not reach its budget",
        "asr/data/batching.py",
        "full = (len(current) + 1) * max(longest, d) > max_batch_seconds",
        "full = (len(current) + 1) * max(longest, d) >= max_batch_seconds",
        ("tests/test_batching.py",),
    ),
]


def tracked_tree(into: Path) -> None:
    """The working tree's files that git tracks or would track, as they are now."""
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    )
    for name in filter(None, listing.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def killed(mutant: Mutant, tree: Path) -> bool:
    path = tree / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: {mutant.path} no longer holds the code to mutate once: {mutant.old!r}")
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=tree,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"},
        )
    finally:
        path.write_text(original)
    return result.returncode != 0


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    survived = 0
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder)
        tracked_tree(tree)
        for mutant in chosen:
            start = time.perf_counter()
            caught = killed(mutant, tree)
            survived += not caught
            verdict = "killed" if caught else "SURVIVED"
            print(f"{verdict:8}  {time.perf_counter() - start:5.1f} s  {mutant.name}  ({' '.join(mutant.tests)})")
    print(f"{len(chosen) - survived} of {len(chosen)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
