"""The killable worker processes that run math-verify for `tapo.core.verify.is_correct`.

sympy can hang or eat memory on a hostile answer, and math-verify's own timeout uses `signal.alarm`, which only works
on the main thread. So every parse+verify runs in a small pool of long-lived worker processes (`python -P
verifier_pool.py`, this very file run as a script: it imports only the standard library and math-verify, never the
caller's `__main__`, torch or tapo). The caller waits `timeout_s` for the verdict; on overrun that one worker is killed
(later calls start a fresh one) and the answer counts as wrong. `concurrent.futures.ProcessPoolExecutor` is not used
because it cannot kill one overrunning task without breaking every other in-flight task of the pool. Each worker runs
under a `WORKER_MEMORY_BYTES` address-space limit. The workers stop at exit (`atexit`); a forked child starts its own.

Protocol: one JSON line [answer | null, gold, full_text | null] in, one line "1" or "0" out.
"""

import atexit
import json
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

WORKER_MEMORY_BYTES = 4 * 2**30
N_WORKERS = min(4, os.cpu_count() or 1)  # worker processes at most; also the threads of one math_reward call
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not part of any check's time bound

class _Worker:
    """One `python -P verifier_pool.py` child process (-P: this file's folder is not put on sys.path)."""

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
    """An idle worker, a newly started one while fewer than N_WORKERS exist, or wait for one to be released."""
    global _n_starting
    with _pool_lock:
        while not _idle_workers and len(_live_workers) + _n_starting >= N_WORKERS:
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


def check_in_worker(answer: str | None, gold: str, full_text: str | None, timeout_s: float) -> bool:
    """math-verify's verdict on `answer` (or, when None, the answer it finds in `full_text`) against `gold`; False
    when the check overran `timeout_s` (the worker is then killed) or the worker died."""
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


def _verify_in_worker(answer: str | None, gold: str, full_text: str | None) -> bool:
    from math_verify import parse, verify  # only worker processes load sympy

    gold_forms = [gold] if "$" in gold or "\\boxed" in gold else [f"${gold}$", f"\\boxed{{{gold}}}"]
    gold_parsed = [parsed for form in gold_forms for parsed in parse(form, parsing_timeout=None)]
    predicted = parse(full_text if answer is None else f"\\boxed{{{answer}}}", parsing_timeout=None)
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
