"""The testbed's policy: a small Llama with a locally built tokenizer, pre-trained in-process on arithmetic chains.

The pre-training mix teaches the format and the arithmetic, but on purpose not perfectly: a share `error_rate` of the
solutions carries one step error at a uniformly drawn step (`tapo.arith.wrong_solution`), so the policy learns to slip
at varied steps and starts RL at the capability boundary DCS needs (groups with both right and wrong rollouts).
Every `synthesis_every`-th batch holds synthesis-format examples (the synthesis prompt for a (wrong, right) pair and
the rule-written `<analysis>`/`<reconstruction>` answer), the testbed's version of the paper's cold start, so that
`constructor=self` has a policy that knows the format.

Pre-training stops at the first check where the SAMPLED accuracy at the RL temperature reaches `target_accuracy`
(greedy accuracy is far higher than sampled for a policy trained on noisy solutions), or after `max_steps`.

The result is a normal HF folder (model, tokenizer with chat template and eos, `pretrain.json` with the cost and
the accuracy curve), cached under the tapo cache folder keyed by a hash of the settings: `tapo train --model <folder>`
loads it like any other model.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
    and a rule-written synthesis per cut (their wording is read off the real output, never copied here)."""
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
    synthesis_every: int = 8  # every this-many-th batch is a synthesis batch (0: no cold-start examples)
    synthesis_batch_size: int = 8  # examples per synthesis batch (they are ~8x longer than a solution)
    batch_size: int = 64  # solution examples per batch
    learning_rate: float = 3e-3  # AdamW, linear warm-up then constant
    warmup_steps: int = 50  # linear warm-up steps
    max_steps: int = 3000  # pre-training stops here even below the target
    check_every: int = 100  # sampled accuracy is measured every this many steps
    target_accuracy: float = 0.25  # stop once the sampled accuracy at `temperature` reaches this
    temperature: float = 1.0  # the RL sampling temperature the target refers to
    n_check: int = 128  # problems of the accuracy check (train split, a seed of their own)
    max_new_tokens: int = 128  # generation budget of the accuracy check

    def key(self, writer: str = "") -> str:
        """The cache key: these settings, the synthesis writer's name and the cache format."""
        payload = json.dumps({**asdict(self), "writer": writer, "format": CACHE_FORMAT}, sort_keys=True)
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
    """Share correct of one sample per problem at `temperature` (0: greedy), plus the share of wrong answers whose
    solution is well formed (a boxed answer) and where the first wrong step lies (the step-error profile)."""
    from tapo.core.verify import is_correct
    from tapo.evaluation.generate import TransformersSampler, prompt_ids

    sampler = TransformersSampler(model, tokenizer, max_new_tokens, temperature, 1.0)
    was_training = model.training
    model.eval()
    texts = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            outs = sampler.generate([prompt_ids(tokenizer, p) for p, _ in chunk], batch_seed=seed + start,
                                    sample_seeds=[0] * len(chunk))
            texts += [o.text for o in outs]
    model.train(was_training)
    correct = [is_correct(t, gold) for t, (_, gold) in zip(texts, problems, strict=True)]
    boxed = [extract_answer(t) is not None for t in texts]
    return {"accuracy": sum(correct) / len(problems), "formatted": sum(boxed) / len(problems)}


def pretrain(settings: PolicySettings, out_dir: str | Path, writer: SynthesisWriter = rule_synthesis,
             log: Callable[[str], None] = print) -> Path:
    """Builds, pre-trains and saves the policy into `out_dir` (see the module docstring); returns `out_dir`."""
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = arith.ArithSpec.parse(settings.task)
    if spec.split != "train":
        raise ValueError(f"{settings.task}: pre-train on the train split only (the test split is the held-out set)")
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
    checks = [(c.problem, str(c.answer)) for c in arith.generate_chains(spec, settings.n_check, seed=settings.seed + 20_000)]
    curve, start, step, n_params = [], time.perf_counter(), 0, sum(p.numel() for p in model.parameters())
    log(f"pre-training a {n_params / 1e6:.2f}M-parameter policy on {settings.task} ({device})")
    model.train()
    while step < settings.max_steps:
        step += 1
        if settings.synthesis_every and step % settings.synthesis_every == 0:
            examples = []
            while len(examples) < settings.synthesis_batch_size:
                example = synthesis_example(arith.sample_chain(spec, rng), rng, writer)
                examples += [example] if example else []
        else:
            examples = [solution_example(arith.sample_chain(spec, rng), rng, settings.error_rate) for _ in range(settings.batch_size)]
        loss = model(**_batch(tokenizer, examples, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % settings.check_every == 0 or step == settings.max_steps:
            point = {"step": step, "loss": loss.item(), "wall_s": time.perf_counter() - start,
                     **sampled_accuracy(model, tokenizer, checks, settings.temperature, settings.max_new_tokens,
                                        seed=settings.seed)}
            curve.append(point)
            log(f"  step {step}: loss {point['loss']:.3f}  sampled accuracy {point['accuracy']:.3f}  "
                f"formatted {point['formatted']:.2f}  ({point['wall_s']:.0f} s)")
            if point["accuracy"] >= settings.target_accuracy:
                break
    greedy = sampled_accuracy(model, tokenizer, checks, 0.0, settings.max_new_tokens, seed=settings.seed)
    final = curve[-1] if curve else {}
    stats = {"settings": asdict(settings), "parameters": n_params, "steps": step, "device": str(device),
             "wall_s": time.perf_counter() - start, "sampled_accuracy": final.get("accuracy", math.nan),
             "greedy_accuracy": greedy["accuracy"], "reached_target": final.get("accuracy", 0) >= settings.target_accuracy,
             "curve": curve}
    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return out_dir


def pretrained_policy(settings: PolicySettings, cache_dir: str | Path | None = None,
                      writer: SynthesisWriter = rule_synthesis, log: Callable[[str], None] = print) -> Path:
    """The cached policy folder for `settings`, pre-trained on first use (one builder at a time, atomically)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    writer_name = f"{writer.__module__}.{writer.__qualname__}"
    return cached_build(cache / f"testbed-policy-{settings.key(writer_name)}", lambda out: pretrain(settings, out, writer, log))


def pretrain_stats(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "pretrain.json").read_text())
