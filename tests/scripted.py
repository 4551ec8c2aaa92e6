"""Scripted rollouts for trainer tests: generation is the only thing replaced, everything after it is real.

Each problem has a right and a wrong step-by-step solution. The replacement for TRL's `_generate_single_turn` returns,
for every group of K rollouts of a problem, `n_right` right solutions then wrong ones; for a synthesis prompt it
returns a well-formed synthesis (copy up to the error, reflect, fix); for a prompt that names no problem (the filler a
rank with fewer syntheses than the others generates, to stay in step with them) an empty completion. Like a real
generator, it stops at the trainer's current generation budget (`max_new_tokens`, which synthesis raises).
"""

import types

# The constructed-row columns TAPOTrainer adds to TRL's batch, by role: the one place that spells their names.
COLUMNS = {"ids": "constructed_completion_ids", "mask": "constructed_completion_mask",
           "advantages": "constructed_advantages", "rows": "constructed_rows", "num_items": "constructed_num_items",
           "num_seqs": "constructed_num_seqs", "old_logps": "constructed_old_per_token_logps",
           "ref_logps": "constructed_ref_per_token_logps"}

PROBLEMS = {  # problem -> (gold, right rollout, wrong rollout)
    "23 + 45 - 12": ("56", "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}",
                     "23 + 45 = 63\n63 - 12 = 51\nThe answer is \\boxed{51}"),
    "7 + 8 + 9": ("24", "7 + 8 = 15\n15 + 9 = 24\nThe answer is \\boxed{24}",
                  "7 + 8 = 16\n16 + 9 = 25\nThe answer is \\boxed{25}"),
}
K = 4


def synthesis_for(prompt: str) -> str:
    """A well-formed synthesis for the problem named in a synthesis prompt."""
    for problem, (_, right, _) in PROBLEMS.items():
        if problem in prompt:
            first_line, *rest = right.splitlines()
            return (f"<analysis>The first step is wrong.</analysis>\n<reconstruction>"
                    f"Wait, the first step is wrong. {first_line}\n" + "\n".join(rest) + "</reconstruction>")
    raise AssertionError("unexpected synthesis prompt")


def one_token_per_char(tokenizer, text: str) -> list[int]:
    """A non-canonical split a sampler can produce: every character its own token (bytes for non-ASCII)."""
    return [i for char in text for i in tokenizer(char, add_special_tokens=False)["input_ids"]]


def canonical(tokenizer, text: str) -> list[int]:
    """The rollout as the tokenizer would encode it, ended by the tokenizer's eos."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def script_generation(trainer, n_right: int | dict[str, int] | None = None, pattern: str | None = None,
                      synthesis=synthesis_for, encode=canonical) -> None:
    """Replace `trainer._generate_single_turn` with the scripted rollouts: per group of K, `n_right` right ones then
    wrong ones (one count for every problem, or a count per problem), or member i right iff pattern[i] == "R"
    (wrong iff "W", blank, i.e. only the terminator, iff "B"). Rollouts are sampled as `encode(tokenizer, text)`
    (terminator included). Synthesis prompts are answered with `synthesis(prompt)`; a prompt naming no problem
    (padding) gets ""."""
    counts: dict[str, int] = {}

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out = []
        for ids in prompt_ids:
            prompt = self._tokenizer.decode(ids)
            problem = next((p for p in PROBLEMS if p in prompt), None)
            if "<analysis>" in prompt:
                sampled = canonical(self._tokenizer, synthesis(prompt))
            elif problem is None:
                sampled = canonical(self._tokenizer, "")
            else:
                n = counts.get(problem, 0)
                counts[problem] = n + 1
                _, right, wrong = PROBLEMS[problem]
                right_count = n_right[problem] if isinstance(n_right, dict) else n_right
                problem_pattern = pattern or "R" * right_count + "W" * (K - right_count)
                text = {"R": right, "W": wrong, "B": ""}[problem_pattern[n % len(problem_pattern)]]
                sampled = encode(self._tokenizer, text)
            out.append(sampled[: self.generation_config.max_new_tokens])
        return out, None

    trainer._generate_single_turn = types.MethodType(generate, trainer)


def generation_batch(trainer):
    """One scored generation batch, as the training loop would buffer it."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; tests call the loss directly
    return trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
