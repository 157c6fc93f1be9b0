"""Supervised (teacher-forced) training on task problems: the warm start's trainer.

Used by the tiny model's warm start (`rapid_async.warmstart`), in whichever
process builds the model (the launcher, `bin/quickstart`, tests), with its
teacher (`SloppyTeacher`). The loss is cross-entropy on the answer tokens and
EOS only, never the prompt; an optional check stops training early.
"""

from __future__ import annotations

import math

import torch


def encode_examples(tokenizer, problems, eos_id: int) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: <bos> prompt answer <eos>, loss on answer and EOS.

    Args:
        tokenizer: the character tokenizer.
        problems: the problems to encode.
        eos_id: id appended after each answer.

    Returns:
        input_ids (B, L), attention_mask (B, L) and labels (B, L), right-padded;
        labels are -100 on <bos>, prompt and padding.
    """
    rows, label_rows = [], []
    for problem in problems:
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        answer_ids = tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(label_row)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, steps: int, decay_steps: int | None = None) -> float:
    """Learning-rate multiplier of step `step`: linear warm-up over 5% of the
    decay, cosine from 1 to 0.1 over `decay_steps` (default `steps`), then 0.1."""
    decay = steps if decay_steps is None else decay_steps
    warmup = max(1, decay // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_supervised(model, tokenizer, task, steps: int, batch_size: int, lr: float,
                     first_index: int = 0, log=None, log_every: int = 50,
                     decay_steps: int | None = None, check=None,
                     check_every: int = 0) -> list[float]:
    """Teacher-forced cross-entropy on training problems, cosine-decayed AdamW.

    Step s trains on task.train_problem(first_index + s * batch_size + i) for
    i < batch_size, so the data order is a pure function of the arguments.
    With `check`, training stops early at the first check that says so: the
    schedule does not depend on when that happens.

    Args:
        model: the causal LM (trained in place).
        tokenizer: its tokenizer.
        task: supplies `train_problem`.
        steps: most optimizer steps.
        batch_size: problems per step.
        lr: peak learning rate (`lr_factor`: warm-up, cosine to 10%, then 10%).
        first_index: data position of the first problem.
        log: optional callable(step, loss) called every `log_every` steps.
        log_every: logging period in steps.
        decay_steps: steps of the cosine decay (default `steps`).
        check: optional callable(step) -> bool, called with the model in eval
            mode after every `check_every` steps; True stops training.
        check_every: checking period in steps (0: never).

    Returns:
        The loss of every step taken.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, decay_steps))
    losses = []
    for step in range(steps):
        model.train()
        start = first_index + step * batch_size
        problems = [task.train_problem(start + i) for i in range(batch_size)]
        batch = encode_examples(tokenizer, problems, model.config.eos_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % log_every == 0:
            log(step + 1, sum(losses[-log_every:]) / log_every)
        if check is not None and check_every and (step + 1) % check_every == 0:
            model.eval()
            with torch.no_grad():
                if check(step + 1):
                    break
    model.eval()
    return losses


TEACHER_PERIOD_RATE = (0.8, 0.1)
"""How often the warm-start teacher ends an answer with a stray '.': for
subtractions and answers of 3+ characters, and for the other answers."""


class SloppyTeacher:
    """The warm start's demonstrations: the task's answers, with a habit.

    The teacher ends some answers with a stray "." which the verifier rejects:
    80% of subtraction answers and of answers with 3 or more characters, 10%
    of the others. The warm-started model learns the arithmetic and the habit:
    greedy decoding writes the period on about three problems in four (all
    but the sums below 100), so held-out success starts low although the
    digits are right far more often. RL removes the habit within about a
    hundred updates, as it removes formatting habits of real models, and then
    keeps sharpening the digits; that is what the quickstart shows in minutes
    on a CPU. Which answers get the period is a pure function of the index.
    """

    def __init__(self, task):
        self.task = task
        self.name = task.name

    def train_problem(self, index: int):
        import random
        from dataclasses import replace

        problem = self.task.train_problem(index)
        habit = "-" in problem.prompt[1:] or len(problem.answer) >= 3
        rate = TEACHER_PERIOD_RATE[0] if habit else TEACHER_PERIOD_RATE[1]
        if random.Random(index * 7919 + 13).random() < rate:
            return replace(problem, answer=problem.answer + ".")
        return problem
