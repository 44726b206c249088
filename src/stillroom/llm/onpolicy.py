"""On-policy distillation: the student writes the continuations the teacher then scores.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv:2306.13649, Algorithm 1): with probability lambda a batch's
continuation is replaced by tokens the student samples after the prompt; the divergence between
teacher and student is then taken on that sequence. Training only on fixed text (lambda = 0)
teaches the student the teacher's next-token distribution on prefixes the student would never
produce itself; on-policy batches cover the prefixes it does produce (the train/inference mismatch
of imitation learning, Ross et al. 2011's DAgger argument).

`OnPolicyTransform` is a `batch_transform` for `stillroom.train.distill`: the loop calls it before
every training step, then runs student and teacher on whatever it returns, so the teacher scores the
sampled sequence in the ordinary step and every term (token_kl with any beta) applies unchanged.
Its randomness (whether the batch is rewritten, and the samples) comes from a generator seeded by
(seed, step), so a resumed run replays the same batches and the global RNG is never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stillroom.errors import StillroomError
from stillroom.llm.causal import CausalLM, sample_continuations
from stillroom.losses import IGNORE_INDEX

SEED_STRIDE = 1_000_003


class OnPolicyTransform:
    """Replace a fraction `fraction` (GKD's lambda) of the batches with student samples.

    Per rewritten row: the prompt is the first P tokens, P = max(prompt_tokens, the position of the
    first label + 1) (for prompt/completion data the prompt ends where the labels start; for plain
    text blocks every position is labelled and `prompt_tokens` sets it), capped at the row's length.
    The student samples min(max_new_tokens, L - P) tokens (ending early at eos); the new row is
    prompt + samples, right-padded; labels[t] = row[t + 1] on the sampled tokens only (the prompt
    and the padding are IGNORE_INDEX), so a `token_kl` term with mask "labels" compares teacher and
    student on the generated tokens.

    Args:
        fraction: lambda in [0, 1]: the probability that a batch is rewritten.
        max_new_tokens: most tokens sampled per row.
        temperature: sampling temperature (GKD samples at 1).
        prompt_tokens: the least prompt kept from plain text blocks (>= 1).
        seed: with the step, seeds each batch's draw.
        eos_token_id, pad_token_id: the tokenizer's ids (eos ends a sample; pad fills the rest).
    """

    def __init__(
        self,
        fraction: float,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        prompt_tokens: int = 1,
        seed: int = 0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise StillroomError(f"on-policy fraction (lambda) must be in [0, 1], got {fraction}")
        if max_new_tokens < 1 or prompt_tokens < 1 or temperature <= 0:
            raise StillroomError(
                "on-policy max_new_tokens and prompt_tokens must be >= 1 and temperature > 0, got "
                f"{max_new_tokens}, {prompt_tokens}, {temperature}"
            )
        self.fraction, self.max_new_tokens, self.temperature = fraction, max_new_tokens, temperature
        self.prompt_tokens, self.seed = prompt_tokens, seed
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * SEED_STRIDE + step)

    def uses_student(self, step: int) -> bool:
        """Whether the batch of training step `step` is rewritten (the first draw of its seed)."""
        if self.fraction == 0.0:
            return False
        return bool(torch.rand((), generator=self._generator(step)) < self.fraction)

    def on_policy_steps(self, steps: int) -> int:
        """How many of steps 0..steps-1 were (or will be) rewritten."""
        return sum(self.uses_student(step) for step in range(steps))

    def __call__(
        self, inputs: Any, targets: torch.Tensor, index: Any, student: nn.Module, step: int
    ) -> tuple[Any, torch.Tensor, Any]:
        if not self.uses_student(step):
            return inputs, targets, index
        if not isinstance(student, CausalLM) or not isinstance(inputs, dict):
            raise StillroomError(
                "on-policy distillation needs a stillroom.llm.CausalLM student and dict batches "
                "({'input_ids', 'attention_mask'}, labels, index)"
            )
        generator = self._generator(step)
        torch.rand((), generator=generator)  # the draw uses_student made: samples come after it
        was_training = student.training
        student.eval()  # sampling from the student as it would run, without dropout
        try:
            ids, mask, labels = self.rewrite(inputs, targets, student, generator)
        finally:
            student.train(was_training)
        return {**inputs, "input_ids": ids, "attention_mask": mask}, labels, index

    def prompt_lengths(self, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) prompt length P of each row (class docstring)."""
        labelled = targets != IGNORE_INDEX
        first = torch.where(
            labelled.any(1), labelled.int().argmax(1), torch.full_like(lengths, targets.shape[1])
        )
        prompts = torch.minimum(torch.clamp(first + 1, min=self.prompt_tokens), lengths)
        return prompts.clamp(min=1)

    @torch.no_grad()
    def rewrite(
        self,
        inputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        student: CausalLM,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) with every row's continuation sampled (B, L)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        block = ids.shape[1]
        lengths = mask.sum(1)
        prompts = self.prompt_lengths(targets, lengths)
        new_ids = torch.full_like(ids, self.pad_token_id)
        new_mask = torch.zeros_like(mask)
        new_labels = torch.full_like(targets, IGNORE_INDEX)
        # rows with equal prompt lengths are sampled together: no left padding, exact positions
        for prompt_length in sorted(set(prompts.tolist())):
            rows = (prompts == prompt_length).nonzero().squeeze(1)
            budget = min(self.max_new_tokens, block - prompt_length)
            if budget <= 0:  # the prompt fills the block: nothing to sample, keep the rows
                new_ids[rows], new_mask[rows], new_labels[rows] = (
                    ids[rows],
                    mask[rows],
                    targets[rows],
                )
                continue
            sampled = sample_continuations(
                student.model,
                ids[rows, :prompt_length],
                budget,
                temperature=self.temperature,
                generator=generator,
                vocab_size=student.vocab_size,
                eos_token_id=self.eos_token_id,
            )
            for row, tokens in zip(rows.tolist(), sampled, strict=True):
                if self.eos_token_id is not None:
                    ends = (tokens == self.eos_token_id).nonzero()
                    tokens = tokens[: int(ends[0]) + 1] if len(ends) else tokens
                sequence = torch.cat([ids[row, :prompt_length], tokens])
                length = len(sequence)
                new_ids[row, :length] = sequence
                new_mask[row, :length] = 1
                # position t predicts token t + 1: labelled where token t + 1 was sampled
                new_labels[row, prompt_length - 1 : length - 1] = sequence[prompt_length:]
        return new_ids, new_mask, new_labels
