"""The testbed's policy: a small Llama with a locally built tokenizer, pre-trained in-process on arithmetic chains.

The pre-training mix teaches the format and the arithmetic, but on purpose not perfectly: a share `error_rate` of the
solutions carries one step error at a uniformly drawn step (`tapo.arith.wrong_solution`), so the policy learns to slip
at varied steps and starts RL at the capability boundary DCS needs (groups with both right and wrong rollouts).
Every `synthesis_every`-th batch holds synthesis-format examples (the synthesis prompt for a (wrong, right) pair and
the rule-written `<analysis>`/`<reconstruction>` answer), so that `constructor=self` has a policy that knows the format.

The main phase stops at the first check where the SAMPLED accuracy at the RL temperature reaches `target_accuracy`
(greedy accuracy is far higher than sampled for a policy trained on noisy solutions), or after `max_steps`. Then the
cold start (the testbed's version of the paper's cold start: `cold_start_steps` more steps, a second stage with an
optimizer of its own and a learning rate decaying to 0, that fine-tunes the main phase's policy) cycles through the
batch kinds of `cold_start_cycle`: synthesis batches, so that the policy writes syntheses `tapo.construct` accepts;
OPSD teacher batches (`teacher_example`: `tapo.opsd.teacher_prompt` with a correct solution in context -> that
solution), so that the policy given OPSD's privileged prompt is the better solver OPSD distils from; and solution
batches with `cold_start_error_rate` of them wrong, which set the sampled accuracy the annealed policy ends with (it
computes almost every step right when it means to). The sampled accuracy measured at the end of the cold start is the
policy's accuracy at the start of RL.

The result is a normal HF folder (model, tokenizer with chat template and eos, `pretrain.json` with the cost and
the accuracy curve), cached under the tapo cache folder keyed by a hash of the settings: `tapo train --model <folder>`
loads it like any other model. The main phase is cached on its own (its key leaves the cold-start settings out), and a
policy with a cold start is built from that cached folder: policies that differ only in their cold start share one
main phase.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tapo import arith
from tapo.core.synthesis import build_synthesis_prompt, write_rule_synthesis
from tapo.core.trajectory import CUTS
from tapo.core.verify import extract_answer
from tapo.data import PROMPT_TEMPLATE
from tapo.models import CACHE_FORMAT, cached_build, default_cache_dir
from tapo.opsd import teacher_prompt

# The vocabulary: one token per printable ASCII character and newline (so any text encodes, nothing is <unk> in
# practice), one per group of 1-3 digits ("36" is one token, "1234" is "123" "4"), one per operator and one per word
# of the texts the testbed always shows (the prompt template, the problem wording, the synthesis prompt and the
# splice's reflection); numbers, operators and words also with a leading space (a step `12 + 7 = 19` is 5 tokens).
# Number tokens make a step `a op b = c` a lookup in a table, which a ~1M-parameter model learns in minutes where
# digit-by-digit carries took it thousands of steps; word tokens cut the ~150-character prompt to ~50 tokens, and the
# forward/backward over the prompt is most of a step's compute.
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
NUMBERS = [str(n) for n in range(10, 1000)] + [f"{n:02d}" for n in range(10)] + [f"{n:03d}" for n in range(100)]


def user_prompt(chain: arith.Chain) -> str:
    """The user message of a rollout for `chain`, as tapo.data builds it from a dataset row."""
    return PROMPT_TEMPLATE.replace("{problem}", chain.problem)


def _fixed_texts() -> list[str]:
    """One of each text the testbed always shows, made by the functions that make them: a prompt, a synthesis prompt
    and a rule-written synthesis per cut (their wording is read off the real output, never copied here). OPSD's
    teacher prompt is not among them: its words outside these texts are spelt in characters, so that the tokenizer,
    and with it every cached main-phase policy, stays as it was before the cold start existed."""
    chain = arith.Chain((12, 7, 3), ("+", "-"))
    problem = user_prompt(chain)
    wrong, reference = arith.solution(chain, error_step=0, error_delta=1), arith.solution(chain)
    texts = [problem]
    for cut in CUTS:
        texts += [build_synthesis_prompt(problem, wrong, reference, cut), write_rule_synthesis(wrong, reference, str(chain.answer), cut)]
    return texts


WORDS = sorted({w for text in _fixed_texts() for w in re.findall(r"[A-Za-z]{2,}", text)}, key=lambda w: (-len(w), w))
# Longest alternative first; a word token only where the whole word stands (no letter on either side).
PIECES = r" ?\d{1,3}| ?[-+*=]| ?(?<![A-Za-z])(?:" + "|".join(WORDS) + r")(?![A-Za-z])|[\s\S]"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# (problem, wrong solution, reference solution, gold) -> the assistant side of a synthesis example, or None.
SynthesisWriter = Callable[[str, str, str, str], "str | None"]
BATCH_KINDS = ("solution", "synthesis", "teacher")
# The settings of the cold start only: not part of a main phase's cache key.
COLD_START_FIELDS = ("teacher_batch_size", "cold_start_steps", "cold_start_cycle", "cold_start_error_rate")


@dataclass(frozen=True)
class PolicySettings:
    """Everything the pre-trained policy depends on; its hash names the cache folder."""

    task: str = "arith:terms=3-6,ops=+-*,max=20,mul_max=5"  # the arith spec to pre-train on (its train split)
    seed: int = 0  # model init, data draw and sampling seed
    hidden_size: int = 128  # width of the Llama
    num_layers: int = 4  # depth of the Llama
    num_heads: int = 4  # attention heads (hidden_size must divide by it)
    intermediate_size: int = 512  # MLP width
    max_positions: int = 2048  # rotary positions, no parameters; synthesis examples are ~350 tokens long
    error_rate: float = 0.5  # share of pre-training solutions with one injected step error
    synthesis_every: int = 8  # main phase: every this-many-th batch is a synthesis batch (0: none)
    synthesis_batch_size: int = 8  # examples per synthesis batch (they are ~6x longer than a solution)
    teacher_batch_size: int = 32  # examples per OPSD teacher batch (teacher prompt + solution: ~2x a solution's length)
    cold_start_steps: int = 0  # steps after the main phase (target reached or max_steps) that cycle `cold_start_cycle`
    # The cold start's batch kinds, in order, repeated (comma-separated BATCH_KINDS): by default two synthesis batches,
    # one OPSD teacher batch and one solution batch per four steps.
    cold_start_cycle: str = "synthesis,synthesis,teacher,solution"
    # Share of the cold start's solutions with a step error (None: error_rate). The cold start sharpens the arithmetic
    # (its synthesis and teacher targets are correct, its learning rate decays), so the policy's sampled accuracy ends
    # near 1 - this share: it sets where in the 20-40% band RL starts.
    cold_start_error_rate: float | None = None
    batch_size: int = 64  # solution examples per batch
    learning_rate: float = 3e-3  # AdamW, linear warm-up then constant (the cold start's: then a linear decay to 0)
    warmup_steps: int = 50  # linear warm-up steps
    max_steps: int = 3000  # pre-training stops here even below the target
    check_every: int = 100  # sampled accuracy is measured every this many steps
    target_accuracy: float = 0.25  # stop once the sampled accuracy at `temperature` reaches this
    temperature: float = 1.0  # the RL sampling temperature the target refers to
    n_check: int = 128  # problems of the accuracy check (train split, a seed of their own)
    max_new_tokens: int = 128  # generation budget of the accuracy check

    def __post_init__(self):
        unknown = set(self.cycle()) - set(BATCH_KINDS)
        if unknown or not self.cycle():
            raise ValueError(f"cold_start_cycle={self.cold_start_cycle!r}: a comma-separated list of {BATCH_KINDS}")

    def cycle(self) -> list[str]:
        return [kind.strip() for kind in self.cold_start_cycle.split(",") if kind.strip()]

    def batch_kind(self, step: int, main_steps: int) -> str:
        """Which kind of batch step `step` (from 1) trains on, the main phase having taken `main_steps` steps (the
        main phase: `main_steps` >= `step`)."""
        if step > main_steps:
            cycle = self.cycle()
            return cycle[(step - main_steps - 1) % len(cycle)]
        return "synthesis" if self.synthesis_every and step % self.synthesis_every == 0 else "solution"

    def main_phase(self) -> PolicySettings:
        """These settings without a cold start: the policy the cold start fine-tunes."""
        return replace(self, **{name: PolicySettings.__dataclass_fields__[name].default for name in COLD_START_FIELDS})

    def key(self, writer: str = "") -> str:
        """The cache key: these settings, the synthesis writer's name and the cache format; without a cold start the
        cold-start settings are left out (they change nothing, and the keys of policies cached before they existed
        stay valid)."""
        fields = asdict(self)
        if not self.cold_start_steps:
            fields = {name: value for name, value in fields.items() if name not in COLD_START_FIELDS}
        payload = json.dumps({**fields, "writer": writer, "format": CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Characters, numbers, operators and the fixed texts' words (see WORDS and PIECES), special tokens for the chat
    roles; `<|end|>` ends every turn and is the eos, so TRL's rollouts stop there."""
    spaced = [w for word in NUMBERS + list("0123456789-+*=") + WORDS for w in (word, " " + word)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL_TOKENS + CHARACTERS + spaced))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces back to text with nothing between them
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
                                   model_max_length=2048)


def rule_synthesis(problem: str, wrong: str, reference: str, gold: str) -> str | None:
    """A synthesis answer written by rule (`tapo.core.synthesis.write_rule_synthesis`: the splice's trajectory as the
    reconstruction, its located first error as the analysis). `problem` is unused: the writer reads the steps."""
    return write_rule_synthesis(wrong, reference, gold)


def _chat_ids(tokenizer, user: str, assistant: str) -> tuple[list[int], int]:
    """(ids of the templated conversation, where the assistant's answer starts)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(assistant + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def solution_example(chain: arith.Chain, rng: random.Random, error_rate: float) -> tuple[str, str]:
    """(user prompt, assistant solution): a correct solution, or with probability `error_rate` one with a step error."""
    user = user_prompt(chain)
    text = arith.wrong_solution(chain, rng)[0] if rng.random() < error_rate else arith.solution(chain)
    return user, text


def synthesis_example(chain: arith.Chain, rng: random.Random, writer: SynthesisWriter) -> tuple[str, str] | None:
    """(synthesis prompt, written synthesis) for a wrong and a right solution of `chain`, as the trainer's self
    constructor asks for it (the problem is the rollout prompt's user message)."""
    problem = user_prompt(chain)
    wrong, reference = arith.wrong_solution(chain, rng)[0], arith.solution(chain)
    target = writer(problem, wrong, reference, str(chain.answer))
    return None if target is None else (build_synthesis_prompt(problem, wrong, reference), target)


def teacher_example(chain: arith.Chain) -> tuple[str, str]:
    """(OPSD's teacher prompt with the correct solution as its reference, that same solution): what
    `tapo.opsd.OPSDTrainer` shows the policy as its own teacher (`teacher_prompt` of the rollout's user message), with
    the answer a privileged teacher is expected to give. The target is the reference itself: on this task the correct
    solution of a chain is one text (one `a op b = c` line per step), so a teacher that exploits the reference copies
    it, and OPSD's sibling reference (a correct rollout of the group) is that text too. Never with a step error: the
    teacher is the better solver OPSD distils from."""
    reference = arith.solution(chain)
    return teacher_prompt(user_prompt(chain), reference), reference


def _examples(kind: str, settings: PolicySettings, spec: arith.ArithSpec, rng: random.Random,
              writer: SynthesisWriter, error_rate: float | None = None) -> list[tuple[str, str]]:
    """One batch of `kind` (BATCH_KINDS), each example from a fresh draw of the train split; solutions with a step
    error at `error_rate` (default: the settings')."""
    if kind == "synthesis":
        examples = []
        while len(examples) < settings.synthesis_batch_size:
            example = synthesis_example(arith.sample_chain(spec, rng), rng, writer)
            examples += [example] if example else []
        return examples
    if kind == "teacher":
        return [teacher_example(arith.sample_chain(spec, rng)) for _ in range(settings.teacher_batch_size)]
    error_rate = settings.error_rate if error_rate is None else error_rate
    return [solution_example(arith.sample_chain(spec, rng), rng, error_rate) for _ in range(settings.batch_size)]


def _batch(tokenizer, examples: list[tuple[str, str]], device) -> dict:
    """Right-padded input ids and labels (-100 on the prompt and the padding: the loss is on the answers only)."""
    encoded = [_chat_ids(tokenizer, user, assistant) for user, assistant in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}


@torch.inference_mode()
def sampled_accuracy(model, tokenizer, problems: list[tuple[str, str]], temperature: float, max_new_tokens: int,
                     seed: int, batch_size: int = 128) -> dict:
    """Share correct of one sample per problem at `temperature` (0: greedy), plus the share of answers that are well
    formed (a boxed answer); each problem in the training prompt."""
    from tapo.evaluation.generate import prompt_ids

    return _accuracy(model, tokenizer, [prompt_ids(tokenizer, p) for p, _ in problems], [gold for _, gold in problems],
                     temperature, max_new_tokens, seed, batch_size)


def opsd_teacher_accuracy(model, tokenizer, rows: list[dict], temperature: float, max_new_tokens: int,
                          seed: int) -> dict:
    """Accuracy on `rows` (dicts with `problem`, `answer` and the correct `solution`) with the plain training prompt
    (`student_*`) and with OPSD's teacher prompt (`teacher_*`, `opsd_teacher_prompt_ids`), greedy and at
    `temperature`. OPSD distils the student towards that teacher, which only helps where the teacher is the better."""
    from tapo.evaluation.generate import prompt_ids

    prompts = {"student": [prompt_ids(tokenizer, r["problem"]) for r in rows],
               "teacher": opsd_teacher_prompt_ids(tokenizer, rows)}
    return {f"{name}_{label}": accuracy
            for name, ids in prompts.items()
            for label, accuracy in _greedy_and_sampled(model, tokenizer, ids, rows, temperature, max_new_tokens,
                                                       seed).items()}


def opsd_teacher_prompt_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """The prompt OPSDTrainer gives its teacher for each row: `tapo.opsd.teacher_prompt` of the training prompt's user
    message with the row's `solution` as reference."""
    from tapo.evaluation.generate import user_turn_ids

    return [user_turn_ids(tokenizer, teacher_prompt(PROMPT_TEMPLATE.replace("{problem}", r["problem"]), r["solution"]))
            for r in rows]


def _greedy_and_sampled(model, tokenizer, prompts: list[list[int]], rows: list[dict], temperature: float,
                        max_new_tokens: int, seed: int) -> dict:
    """{"greedy": accuracy, "sampled": accuracy at `temperature`} of one sample per prompt against the rows' answers."""
    golds = [str(r["answer"]) for r in rows]
    return {label: _accuracy(model, tokenizer, prompts, golds, temp, max_new_tokens, seed)["accuracy"]
            for label, temp in (("greedy", 0.0), ("sampled", temperature))}


def _accuracy(model, tokenizer, prompts: list[list[int]], golds: list[str], temperature: float, max_new_tokens: int,
              seed: int, batch_size: int = 128) -> dict:
    """Share correct of one sample per prompt (token ids) at `temperature`, and the share with a boxed answer."""
    from tapo.core.verify import is_correct
    from tapo.evaluation.generate import TransformersSampler

    sampler = TransformersSampler(model, tokenizer, max_new_tokens, temperature, 1.0)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        texts = [o.text for o in _sample_texts(sampler, prompts, seed, batch_size)]
    model.train(was_training)
    correct = [is_correct(t, gold) for t, gold in zip(texts, golds, strict=True)]
    boxed = [extract_answer(t) is not None for t in texts]
    return {"accuracy": sum(correct) / len(prompts), "formatted": sum(boxed) / len(prompts)}


def _sample_texts(sampler, prompts: list[list[int]], seed: int, batch_size: int) -> list:
    """The sampler's completions of `prompts`, in batches seeded from `seed` and the batch's start."""
    outs = []
    for start in range(0, len(prompts), batch_size):
        outs += sampler.generate(prompts[start : start + batch_size], batch_seed=seed + start,
                                 sample_seeds=[0] * len(prompts[start : start + batch_size]))
    return outs


@torch.inference_mode()
def self_synthesis_acceptance(model, tokenizer, rows: list[dict], k: int = 8, temperature: float = 1.0,
                              max_new_tokens: int = 48, synthesis_max_tokens: int = 160, ref_max_length: int = 112,
                              n_pos: int = 1, n_neg: int = 2, m_max: int = 4, cut: str = "before_error",
                              prefix_match: str = "strict", seed: int = 0, batch_size: int = 128,
                              sampler_class=None) -> dict:
    """How many of the policy's own syntheses `constructor=self` would accept, by the trainer's path, on `rows`
    (dicts with `problem` and `answer`):

    1. K rollouts per problem at `temperature` (`max_new_tokens` each), graded by `tapo.core.verify.is_correct` (the
       reward the trainer re-verifies with); blank rollouts are left out of pairing, as the trainer does.
    2. DCS per group (`tapo.core.selection.select_candidates` with `n_pos`, `n_neg`, `m_max`, a seeded rng per group):
       (own wrong rollout, own right rollout) pairs.
    3. `tapo.construct.construct(..., "self")`: the synthesis prompt of each pair as the chat's user turn, one sample
       at `temperature` with `synthesis_max_tokens`, an output without eos marked `Truncated`; parse and assemble
       with `cut` and `prefix_match`.
    4. As TAPOTrainer: an assembled trajectory longer than `ref_max_length` tokens (`tapo.core.tokens.
       trajectory_token_ids`, prefix from the wrong rollout's ids; here its text re-encoded, where the trainer has
       the sampled ids) is `too_long`, one whose answer does not re-verify is `wrong_answer`, the rest accepted.

    Returns counts: problems, rollouts, rollout_accuracy, eligible_groups, attempted, parsed, truncated, accepted,
    accept_rate (accepted / attempted), parse_rate, and rejected {reason: count} over `tapo.core.synthesis.REJECTIONS`.
    `sampler_class` (default `tapo.evaluation.generate.TransformersSampler`) is the generation backend, replaceable in
    tests. The caller's RNG state is left as it was."""
    from collections import Counter

    from tapo.construct import ConstructionRequest, Truncated, construct
    from tapo.core.selection import select_candidates
    from tapo.core.synthesis import REJECTIONS, TOO_LONG, WRONG_ANSWER, is_blank
    from tapo.core.tokens import trajectory_token_ids
    from tapo.core.verify import is_correct
    from tapo.evaluation.generate import TransformersSampler, prompt_ids, user_turn_ids

    sampler_class = sampler_class or TransformersSampler
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        rollouts = sampler_class(model, tokenizer, max_new_tokens, temperature, 1.0)
        prompts = [prompt_ids(tokenizer, r["problem"]) for r in rows for _ in range(k)]
        texts = [o.text for o in _sample_texts(rollouts, prompts, seed, batch_size)]
        correct = [is_correct(t, str(rows[i // k]["answer"])) for i, t in enumerate(texts)]

        requests, n_eligible = [], 0
        for g, row in enumerate(rows):
            members = [i for i in range(k) if not is_blank(texts[g * k + i])]
            pairs = select_candidates([correct[g * k + i] for i in members], n_pos, n_neg, m_max,
                                      random.Random(f"{seed}-{g}"))
            n_eligible += bool(pairs)
            user = PROMPT_TEMPLATE.replace("{problem}", row["problem"])
            requests += [ConstructionRequest(user, texts[g * k + members[w]], texts[g * k + members[r]],
                                             str(row["answer"])) for w, r in pairs]

        writer = sampler_class(model, tokenizer, synthesis_max_tokens, temperature, 1.0)

        def generate(messages: list[str]) -> list[str]:
            outs = _sample_texts(writer, [user_turn_ids(tokenizer, m) for m in messages], seed + 1, batch_size)
            return [Truncated(o.text) if o.truncated else o.text for o in outs]

        built = construct(requests, "self", generate, cut=cut, prefix_match=prefix_match)
    model.train(was_training)
    rejected, accepted = Counter(), 0
    for request, c in zip(requests, built, strict=True):
        if c.trajectory is None:
            rejected[c.rejection] += 1
            continue
        wrong_ids = tokenizer(request.wrong, add_special_tokens=False)["input_ids"]
        ids, _ = trajectory_token_ids(tokenizer, c.trajectory, wrong_ids, tokenizer.eos_token_id)
        if len(ids) > ref_max_length:
            rejected[TOO_LONG] += 1
        elif not is_correct(c.trajectory.text, request.gold):
            rejected[WRONG_ANSWER] += 1
        else:
            accepted += 1
    n, parsed = len(requests), sum(c.parsed for c in built)
    return {"problems": len(rows), "rollouts": len(texts), "rollout_accuracy": sum(correct) / max(1, len(texts)),
            "eligible_groups": n_eligible, "attempted": n, "parsed": parsed, "truncated": sum(c.truncated for c in built),
            "accepted": accepted, "accept_rate": accepted / n if n else math.nan,
            "parse_rate": parsed / n if n else math.nan, "rejected": {reason: rejected[reason] for reason in REJECTIONS}}


def pretrain(settings: PolicySettings, out_dir: str | Path, writer: SynthesisWriter = rule_synthesis,
             log: Callable[[str], None] = print) -> Path:
    """Builds, pre-trains (main phase, then the cold start if any) and saves the policy into `out_dir` (see the module
    docstring); returns `out_dir`. `pretrained_policy` builds the two stages as two cached folders instead."""
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = _train_spec(settings)
    tokenizer = build_tokenizer()
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                         num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
                         num_key_value_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                         max_position_embeddings=settings.max_positions, tie_word_embeddings=True, **ids)
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(config).to(device)
    model.generation_config = GenerationConfig(**ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, settings.warmup_steps)))
    rng = random.Random(f"pretrain-{settings.seed}")
    # Every example is a fresh draw from the train split (repeats allowed), never a test one.
    checks = [(c.problem, str(c.answer)) for c in _check_chains(settings, spec)]
    curve, start, step, n_params = [], time.perf_counter(), 0, sum(p.numel() for p in model.parameters())
    log(f"pre-training a {n_params / 1e6:.2f}M-parameter policy on {settings.task} ({device})")
    model.train()
    while step < settings.max_steps:
        step += 1
        kind = settings.batch_kind(step, settings.max_steps)
        loss = _train_step(model, tokenizer, _examples(kind, settings, spec, rng, writer), optimizer, schedule, device)
        if step % settings.check_every == 0 or step == settings.max_steps:
            point = _check(model, tokenizer, settings, checks, step, "main", loss, time.perf_counter() - start, log)
            curve.append(point)
            if point["accuracy"] >= settings.target_accuracy:
                break
    greedy = sampled_accuracy(model, tokenizer, checks, 0.0, settings.max_new_tokens, seed=settings.seed)
    final = curve[-1] if curve else {}
    stats = {"settings": asdict(settings.main_phase()), "parameters": n_params, "steps": step, "main_steps": step,
             "cold_start_steps": 0, "batches": _main_batches(settings, step), "device": str(device),
             "wall_s": time.perf_counter() - start, "sampled_accuracy": final.get("accuracy", math.nan),
             "greedy_accuracy": greedy["accuracy"], "reached_target": final.get("accuracy", 0) >= settings.target_accuracy,
             "curve": curve}
    if settings.cold_start_steps:
        stats = _cold_start(model, tokenizer, settings, stats, writer, log)
    _save(model, tokenizer, stats, out_dir)
    return out_dir


def cold_start(settings: PolicySettings, main_folder: str | Path, out_dir: str | Path,
               writer: SynthesisWriter = rule_synthesis, log: Callable[[str], None] = print) -> Path:
    """The cold start of `settings` on the main-phase policy saved in `main_folder` (its `pretrain.json` is the
    stats the cold start extends), saved into `out_dir`; returns `out_dir`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LlamaForCausalLM.from_pretrained(main_folder).to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(main_folder)
    stats = _cold_start(model, tokenizer, settings, pretrain_stats(main_folder), writer, log)
    _save(model, tokenizer, stats, Path(out_dir))
    return Path(out_dir)


def _cold_start(model, tokenizer, settings: PolicySettings, main: dict, writer: SynthesisWriter,
                log: Callable[[str], None]) -> dict:
    """Trains `model` (the main phase's policy, `main` its stats) through the cold start, in place, with an optimizer
    of its own (the main phase's learning rate and warm-up, then a linear decay to 0 at the cold start's last step:
    a fine-tune that ends annealed) and data drawn from a seed of its own; returns the policy's stats: the
    main phase's extended by the cold start's steps, batches, wall time and curve, the final sampled and greedy
    accuracy, and, measured at the end on the check problems, `self_synthesis` (`self_synthesis_acceptance` with its
    defaults: the testbed's K, lengths and DCS) and `opsd_teacher` (accuracy with OPSD's teacher prompt)."""
    device = model.device
    spec = _train_spec(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    n = settings.cold_start_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, settings.warmup_steps)) * (1.0 - s / n))
    rng = random.Random(f"cold-start-{settings.seed}")
    error_rate = settings.error_rate if settings.cold_start_error_rate is None else settings.cold_start_error_rate
    chains = _check_chains(settings, spec)
    checks = [(c.problem, str(c.answer)) for c in chains]
    cycle, curve, start, main_steps = settings.cycle(), [], time.perf_counter(), main.get("main_steps", main["steps"])
    batches = {kind: main.get("batches", _main_batches(settings, main_steps)).get(kind, 0) for kind in BATCH_KINDS}
    log(f"cold start: {settings.cold_start_steps} steps cycling {','.join(cycle)} after {main_steps} main-phase steps")
    model.train()
    for step in range(1, settings.cold_start_steps + 1):
        kind = settings.batch_kind(main_steps + step, main_steps)
        batches[kind] += 1
        examples = _examples(kind, settings, spec, rng, writer, error_rate)
        loss = _train_step(model, tokenizer, examples, optimizer, schedule, device)
        if step % settings.check_every == 0 or step == settings.cold_start_steps:
            curve.append(_check(model, tokenizer, settings, checks, main_steps + step, "cold_start", loss,
                                main["wall_s"] + time.perf_counter() - start, log))
    wall_s = time.perf_counter() - start
    greedy = sampled_accuracy(model, tokenizer, checks, 0.0, settings.max_new_tokens, seed=settings.seed)
    rows = [{"problem": c.problem, "answer": str(c.answer), "solution": arith.solution(c)} for c in chains]
    opsd_teacher = _greedy_and_sampled(model, tokenizer, opsd_teacher_prompt_ids(tokenizer, rows), rows,
                                       settings.temperature, settings.max_new_tokens, settings.seed)
    synthesis = self_synthesis_acceptance(model, tokenizer, rows, temperature=settings.temperature,
                                          max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    log(f"  cold start done ({wall_s:.0f} s): greedy {greedy['accuracy']:.3f}; with OPSD's teacher prompt greedy "
        f"{opsd_teacher['greedy']:.3f}, sampled {opsd_teacher['sampled']:.3f}; own syntheses accepted "
        f"{synthesis['accepted']} of {synthesis['attempted']}")
    main_curve = [{"phase": "main", **point} for point in main["curve"]]
    return {**main, "settings": asdict(settings), "steps": main_steps + settings.cold_start_steps,
            "main_steps": main_steps, "cold_start_steps": settings.cold_start_steps, "batches": batches,
            "main_wall_s": main["wall_s"], "cold_start_wall_s": wall_s, "wall_s": main["wall_s"] + wall_s,
            "main_sampled_accuracy": main["sampled_accuracy"], "main_greedy_accuracy": main["greedy_accuracy"],
            "sampled_accuracy": curve[-1]["accuracy"], "greedy_accuracy": greedy["accuracy"],
            "opsd_teacher": opsd_teacher, "self_synthesis": synthesis, "curve": main_curve + curve}


def _train_spec(settings: PolicySettings) -> arith.ArithSpec:
    spec = arith.ArithSpec.parse(settings.task)
    if spec.split != "train":
        raise ValueError(f"{settings.task}: pre-train on the train split only (the test split is the held-out set)")
    return spec


def _check_chains(settings: PolicySettings, spec: arith.ArithSpec) -> list[arith.Chain]:
    """The accuracy check's chains: train split, a seed of their own."""
    return arith.generate_chains(spec, settings.n_check, seed=settings.seed + 20_000)


def _main_batches(settings: PolicySettings, main_steps: int) -> dict:
    """How many batches of each kind the main phase's `main_steps` steps trained on."""
    kinds = [settings.batch_kind(step, main_steps) for step in range(1, main_steps + 1)]
    return {kind: kinds.count(kind) for kind in BATCH_KINDS}


def _train_step(model, tokenizer, examples, optimizer, schedule, device) -> torch.Tensor:
    loss = model(**_batch(tokenizer, examples, device)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _check(model, tokenizer, settings, checks, step: int, phase: str, loss, wall_s: float, log) -> dict:
    """A curve point: the sampled accuracy at the RL temperature on the check problems."""
    point = {"step": step, "phase": phase, "loss": loss.item(), "wall_s": wall_s,
             **sampled_accuracy(model, tokenizer, checks, settings.temperature, settings.max_new_tokens,
                                seed=settings.seed)}
    log(f"  step {step} ({phase}): loss {point['loss']:.3f}  sampled accuracy {point['accuracy']:.3f}  "
        f"formatted {point['formatted']:.2f}  ({point['wall_s']:.0f} s)")
    return point


def _save(model, tokenizer, stats: dict, out_dir: Path) -> None:
    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps(stats, indent=2))


def pretrained_policy(settings: PolicySettings, cache_dir: str | Path | None = None,
                      writer: SynthesisWriter = rule_synthesis, log: Callable[[str], None] = print) -> Path:
    """The cached policy folder for `settings`, pre-trained on first use (one builder at a time, atomically). With a
    cold start, the main phase's folder is cached first (or found) and the cold start continues from it."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    writer_name = f"{writer.__module__}.{writer.__qualname__}"
    target = cache / f"testbed-policy-{settings.key(writer_name)}"
    if not settings.cold_start_steps:
        return cached_build(target, lambda out: pretrain(settings, out, writer, log))
    if target.exists():
        return target
    main = pretrained_policy(settings.main_phase(), cache, writer, log)
    return cached_build(target, lambda out: cold_start(settings, main, out, writer, log))


def pretrain_stats(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "pretrain.json").read_text())
