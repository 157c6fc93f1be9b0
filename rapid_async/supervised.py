"""Supervised (teacher-forced) training on task problems: the warm start's trainer.

Used by the tiny model's warm start (`rapid_async.tinymodel.warm_start`), in
whichever process builds the model (the launcher, `bin/quickstart`, tests).
The loss is cross-entropy on the answer tokens and EOS only, never the prompt.
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


def train_supervised(model, tokenizer, task, steps: int, batch_size: int, lr: float,
                     first_index: int = 0, log=None, log_every: int = 50) -> list[float]:
    """Teacher-forced cross-entropy on training problems, cosine-decayed AdamW.

    Step s trains on task.train_problem(first_index + s * batch_size + i) for
    i < batch_size, so the data order is a pure function of the arguments.

    Args:
        model: the causal LM (trained in place).
        tokenizer: its tokenizer.
        task: supplies `train_problem`.
        steps: optimizer steps.
        batch_size: problems per step.
        lr: peak learning rate (linear warm-up over 5% of steps, cosine to 10%).
        first_index: data position of the first problem.
        log: optional callable(step, loss) called every `log_every` steps.
        log_every: logging period in steps.

    Returns:
        The loss of every step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for step in range(steps):
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
    model.eval()
    return losses
