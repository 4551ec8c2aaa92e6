"""Math answer checking: `extract_answer`, `is_correct`, and the TRL reward function `math_reward`.

The reward is binary: r = 1 if the completion's final answer is mathematically equal to the gold answer (as judged by
math-verify: sympy equality, numeric equality to 6 decimals, sets, intervals, ...), else 0.

Safety design. sympy can hang or eat memory on a hostile answer (20 nested `\\frac` already take minutes) and
math-verify's own timeout uses `signal.alarm`, which only works on the main thread. So every parse+verify runs in a
small pool of long-lived worker processes (`python -P verify.py`, this very file run as a script: it imports only the
standard library and math-verify, never the caller's `__main__` or torch). The caller waits `timeout_s` for the
verdict; on overrun that one worker is killed (later calls start a fresh one) and the answer counts as wrong.
`concurrent.futures.ProcessPoolExecutor` is not used because it cannot kill one overrunning task without breaking
every other in-flight task of the pool. Most rewards never reach a worker: an extracted answer that equals the gold
string after light normalisation is accepted in-process.

Memory guard: only the last `MAX_COMPLETION_CHARS` characters of a completion are read (a final answer lives at the
end), and each worker runs under a `WORKER_MEMORY_BYTES` address-space limit.
"""

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait

MAX_COMPLETION_CHARS = 100_000  # longer completions are cut to their last part before extraction
FULL_TEXT_FALLBACK_CHARS = 1_000  # without a boxed/"answer is" answer, only this short a text goes to math-verify whole
MAX_ANSWER_CHARS = 10_000  # a longer box argument or "answer is" line is not an answer (and would stall sympy)
WORKER_MEMORY_BYTES = 4 * 2**30
_N_WORKERS = min(4, os.cpu_count() or 1)
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not part of any check's time bound

# `.*` is greedy, so each pattern finds the LAST occurrence by backtracking from the end once; the possessive `*+`
# never gives back what it took, so the whole search is linear time.
_LAST_BOX_COMMAND = re.compile(r".*\\(?:boxed|fbox)(?![A-Za-z])", re.DOTALL)
_LAST_ANSWER_PHRASE = re.compile(r".*answer[\s*]*+(?::|is\b)[\s*:$]*+(?=[^\s*:$])", re.DOTALL | re.IGNORECASE)
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # `\{` and `\}` are literal braces, not grouping
_SPACES = re.compile(r"\s*")
_TOKEN = re.compile(r"[^\s$]*")


def _box_argument(text: str, start: int) -> str | None:
    """The argument of a box command ending at `start`: a balanced `{...}` group, or the next token (`\\boxed 5`).
    None when the group is unbalanced within MAX_ANSWER_CHARS (e.g. a completion truncated inside its answer)."""
    start = _SPACES.match(text, start).end()
    if text[start : start + 1] != "{":
        token = _TOKEN.match(text, start).group()
        return token if 0 < len(token) <= MAX_ANSWER_CHARS else None
    depth = 0
    for brace in _BRACE_OR_ESCAPE.finditer(text, start, start + MAX_ANSWER_CHARS + 2):  # `{`, content, `}`
        depth += {"{": 1, "}": -1}.get(brace.group(), 0)
        if depth == 0:
            return text[start + 1 : brace.start()].strip()
    return None


def _last_box(text: str) -> str | None:
    box = _LAST_BOX_COMMAND.match(text)
    return _box_argument(text, box.end()) if box else None


def _answer_phrase(text: str) -> str | None:
    """X in the last "answer is X" / "Answer: X" / "**Final Answer:** $X$." (to the end of that line or sentence)."""
    match = _LAST_ANSWER_PHRASE.match(text)
    if match is None:
        return None
    line_end = text.find("\n", match.end())
    value = text[match.end() : line_end if line_end >= 0 else len(text)]
    value = value.partition(". ")[0]  # "The answer is 5. Indeed, ..." -> "5"
    value = value.lstrip(" \t*$").rstrip(" \t*$.")  # markdown bold, inline math, final period
    value = value.removeprefix("\\(").removeprefix("\\[").removesuffix("\\)").removesuffix("\\]").strip()
    return value if 0 < len(value) <= MAX_ANSWER_CHARS else None


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed,
    also `\\boxed 5`), else X of the last "answer is X" / "answer: X" (case-insensitive, `$`, `**` and a final period
    stripped), else None. Linear time: 1 MB of text takes milliseconds."""
    if not isinstance(text, str):
        return None
    answer = _last_box(text)
    return answer if answer is not None else _answer_phrase(text)


def _normalize(answer: str) -> str:
    """Whitespace collapsed, `$...$` unwrapped, `\\dfrac`/`\\tfrac` -> `\\frac`: strings equal after this are equal
    answers, so the fast path never accepts what math-verify would reject."""
    answer = " ".join(answer.split())
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer.strip("$")
    return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def is_correct(completion: str, gold: str, timeout_s: float = 5.0) -> bool:
    """True iff the final answer of `completion` equals `gold` (any type; str(gold) is used) per math-verify.

    The extracted answer is parsed as `\\boxed{answer}`; if nothing was extracted, math-verify's own extraction runs on
    the whole completion only when it has at most FULL_TEXT_FALLBACK_CHARS characters (else False: a long text with no
    marked answer would otherwise be scored by whatever number comes last). Gold without `$` or `\\boxed` is parsed as
    both `$gold$` and `\\boxed{gold}`. `timeout_s` bounds the parse+verify work; waiting for a free worker and a
    worker's start-up are not counted. Thread-safe; never raises on bad input (non-str completion, None gold -> False).
    """
    if not isinstance(completion, str) or not completion.strip() or gold is None:
        return False
    gold = str(gold).strip()
    if not gold:
        return False
    text = completion[-MAX_COMPLETION_CHARS:]
    answer = extract_answer(text)
    if answer == "":
        return False
    if answer is not None and _normalize(answer) == _normalize(_last_box(gold) or gold):
        return True
    if answer is None and len(text) > FULL_TEXT_FALLBACK_CHARS:
        return False
    return _check_in_worker(answer, gold, text if answer is None else None, timeout_s)


def _completion_text(completion) -> str | None:
    """A TRL completion as text: a plain string, or a chat message list whose last message's content is taken."""
    if isinstance(completion, list) and completion:
        completion = completion[-1]
    if isinstance(completion, dict):
        completion = completion.get("content")
    return completion if isinstance(completion, str) else None


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL reward function: r_i = 1.0 if completion i's final answer equals answer[i], else 0.0.

    `completions` are strings or chat message lists; `answer` is the dataset column of gold answers, one per
    completion. Checks run concurrently (one thread per worker process), each under its own 5 s bound."""
    if len(answer) != len(completions):
        raise ValueError(f"math_reward: got {len(completions)} completions but {len(answer)} gold answers")
    texts = [_completion_text(completion) for completion in completions]
    with ThreadPoolExecutor(max_workers=_N_WORKERS) as threads:
        return [float(correct) for correct in threads.map(is_correct, texts, answer)]


# ---------------------------------------------------------------------------------------------------------------------
# Worker processes. Protocol: one JSON line [answer | null, gold, full_text | null] in, one line "1" or "0" out.


class _Worker:
    """One `python -P verify.py` child process (-P: this file's folder is not put on sys.path)."""

    def __init__(self):
        command = [sys.executable, "-P", os.path.abspath(__file__)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._read_line(_STARTUP_TIMEOUT_S) != b"ready\n":
            self.close()
            raise RuntimeError(f"math-verify worker `{' '.join(command)}` did not start; is math-verify installed?")

    def _read_line(self, timeout_s: float) -> bytes | None:
        readable = wait([self.process.stdout], max(timeout_s, 0.0))  # poll-based: no 1024-fd limit like select()
        return self.process.stdout.readline() if readable else None

    def check(self, answer: str | None, gold: str, full_text: str | None, timeout_s: float) -> bool | None:
        """The verdict, or None when the worker overran `timeout_s` or died (it must then be closed)."""
        try:
            self.process.stdin.write(json.dumps([answer, gold, full_text]).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:
            return None
        return {b"1\n": True, b"0\n": False}.get(self._read_line(timeout_s))

    def kill(self):
        self.process.kill()
        self.process.wait()

    def close(self):
        self.kill()
        self.process.stdin.close()
        self.process.stdout.close()


_pool_lock = threading.Condition()
_idle_workers: list[_Worker] = []
_live_workers: set[_Worker] = set()
_n_starting = 0


def _acquire() -> _Worker:
    """An idle worker, a newly started one while fewer than _N_WORKERS exist, or wait for one to be released."""
    global _n_starting
    with _pool_lock:
        while not _idle_workers and len(_live_workers) + _n_starting >= _N_WORKERS:
            _pool_lock.wait()
        if _idle_workers:
            return _idle_workers.pop()
        _n_starting += 1
    worker = None
    try:
        worker = _Worker()  # slow (imports sympy), so outside the lock
    finally:
        with _pool_lock:
            _n_starting -= 1
            if worker is not None:
                _live_workers.add(worker)
            _pool_lock.notify()
    return worker


def _release(worker: _Worker, healthy: bool):
    with _pool_lock:
        keep = healthy and worker in _live_workers  # not in it: shutdown() ran meanwhile
        if keep:
            _idle_workers.append(worker)
        else:
            _live_workers.discard(worker)
        _pool_lock.notify()
    if not keep:
        worker.close()


def _check_in_worker(answer: str | None, gold: str, full_text: str | None, timeout_s: float) -> bool:
    worker = _acquire()
    verdict = None
    try:
        verdict = worker.check(answer, gold, full_text, timeout_s)
    finally:
        _release(worker, healthy=verdict is not None)
    return verdict is True


def shutdown():
    """Stop all worker processes (also run at exit). Busy ones are killed and their checks return False; the pool
    restarts lazily on the next check."""
    with _pool_lock:
        idle = list(_idle_workers)
        busy = _live_workers.difference(idle)
        _idle_workers.clear()
        _live_workers.clear()
    for worker in idle:
        worker.close()
    for worker in busy:
        worker.kill()  # its owning thread closes the pipes after its read fails


def _forget_parent_workers():
    """In a forked child the parent's workers (and maybe a held lock) are not ours: start from an empty pool."""
    global _pool_lock, _idle_workers, _live_workers, _n_starting
    _pool_lock, _idle_workers, _live_workers, _n_starting = threading.Condition(), [], set(), 0


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_parent_workers)


_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])|[±∓]")
_SIGNS = {"\\pm": "+-", "±": "+-", "\\mp": "-+", "∓": "-+"}  # the sign in the first and in the second value


def _expand_plus_minus(latex: str) -> str:
    """A bare answer with ± as the two values it stands for: `\\frac{-1\\pm\\sqrt{17}}{2}` ->
    `\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}` (all ± signs move together, ∓ the other way); unchanged
    without ±. math-verify reads a top-level `a \\pm b` as that two-value set itself, but not a ± nested in a fraction
    or a root. So such an answer equals a gold listing both values (in any order, both being a set), and a single one
    of them stays wrong against a two-value gold, as math-verify compares sets."""
    if not _PLUS_MINUS.search(latex):
        return latex
    plus = _PLUS_MINUS.sub(lambda sign: _SIGNS[sign.group()][0], latex)
    minus = _PLUS_MINUS.sub(lambda sign: _SIGNS[sign.group()][1], latex)
    return f"{plus}, {minus}"


def _verify_in_worker(answer: str | None, gold: str, full_text: str | None) -> bool:
    from math_verify import parse, verify  # only worker processes load sympy

    if "$" in gold or "\\boxed" in gold:
        gold_forms = [gold]
    else:
        gold = _expand_plus_minus(gold)
        gold_forms = [f"${gold}$", f"\\boxed{{{gold}}}"]
    gold_parsed = [parsed for form in gold_forms for parsed in parse(form, parsing_timeout=None)]
    predicted_form = full_text if answer is None else f"\\boxed{{{_expand_plus_minus(answer)}}}"
    predicted = parse(predicted_form, parsing_timeout=None)
    return bool(gold_parsed and predicted and verify(gold_parsed, predicted, timeout_seconds=None))


def _watch_parent(parent_pid: int):
    """Exit when the parent dies mid-check (an idle worker exits on stdin EOF anyway)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _serve():
    import logging
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes our stdin
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the parent times us
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the reply stream
    _verify_in_worker("1", "1", None)  # warm up: import sympy, compile math-verify's regexes
    replies.write(b"ready\n")
    replies.flush()
    for line in sys.stdin.buffer:
        try:
            correct = _verify_in_worker(*json.loads(line))
        except Exception:  # garbage in, or sympy giving up (RecursionError, MemoryError): not correct
            correct = False
        replies.write(b"1\n" if correct else b"0\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
