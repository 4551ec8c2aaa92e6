"""Constructors: splice / synthesis-writer dispatch, the local HF teacher, and the OpenAI-compatible endpoint teacher
(against a real HTTP server on 127.0.0.1), plus the trainer's teacher wiring."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from scripted import generation_batch, synthesis_for
from tapo.construct import ConstructionRequest, HFGenerator, OpenAIChatGenerator, Truncated, construct
from tapo.core.verify import is_correct

WRONG = "23 + 45 = 63\n63 - 12 = 51\nThe answer is \\boxed{51}"
RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"
REQUEST = ConstructionRequest("23 + 45 - 12", WRONG, RIGHT, "56")


def test_splice_needs_no_generator_and_builds_a_correct_trajectory():
    [built] = construct([REQUEST], "splice")
    assert built.parsed and built.raw is None
    prefix, reflection, _ = built.trajectory.parts()
    assert WRONG.startswith(prefix) and "wrong" in reflection.lower() and is_correct(built.trajectory.text, "56")


def test_writer_constructors_batch_one_call_and_report_unparsed_outputs():
    calls = []

    def writer(messages):
        calls.append(messages)
        return [synthesis_for(messages[0]), "no tags at all"]

    good, bad = construct([REQUEST, REQUEST], "teacher", writer)
    assert len(calls) == 1 and len(calls[0]) == 2 and "23 + 45 - 12" in calls[0][0]
    assert good.parsed and is_correct(good.trajectory.text, "56") and "Wait" in good.trajectory.parts()[1]
    assert not bad.parsed and bad.trajectory is None and bad.raw == "no tags at all"
    # No requests still makes the (empty) call: the trainer's "self" generator is a collective every rank must enter.
    assert construct([], "teacher", lambda messages: calls.append(messages) or []) == [] and calls[-1] == []
    with pytest.raises(ValueError, match="needs a generation function"):
        construct([REQUEST], "self")
    with pytest.raises(ValueError, match="unknown constructor"):
        construct([REQUEST], "oracle")


class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.path, self.headers["Authorization"], body))
        # Like an endpoint whose budget is too small for the synthesis: it stops at max_tokens, finish_reason "length".
        finish_reason = "length" if body["max_tokens"] < 32 else "stop"
        reply = {"choices": [{"message": {"content": synthesis_for(body["messages"][0]["content"])},
                              "finish_reason": finish_reason}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_teacher_against_a_local_server(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TAPO_TEST_KEY", "secret")
        teacher = OpenAIChatGenerator(f"http://127.0.0.1:{server.server_port}/v1/", "teacher-model",
                                      api_key_env="TAPO_TEST_KEY", max_tokens=64, timeout_s=10)
        [built] = construct([REQUEST], "teacher", teacher)
        teacher.max_tokens = 8
        [cut_short] = construct([REQUEST], "teacher", teacher)
    finally:
        server.shutdown()
    path, auth, body = _ChatHandler.seen[-2]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "teacher-model" and body["max_tokens"] == 64
    assert built.parsed and is_correct(built.trajectory.text, "56") and not built.truncated
    assert cut_short.truncated and _ChatHandler.seen[-1][2]["max_tokens"] == 8


def test_unreachable_endpoint_is_a_failed_construction_not_a_crash():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    port = server.server_port
    server.server_close()  # nothing listens there now
    teacher = OpenAIChatGenerator(f"http://127.0.0.1:{port}/v1", "m", timeout_s=5)
    [built] = construct([REQUEST], "teacher", teacher)
    assert not built.parsed and built.raw.startswith("[teacher request failed")


def test_local_hf_teacher_generates_one_text_per_message(tiny_model_dir):
    teacher = HFGenerator(str(tiny_model_dir), max_new_tokens=4, temperature=0.0, batch_size=2)
    out = teacher(["a", "bb", "ccc"])
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    # The random model does not stop within 4 tokens (greedy, so the same every run): each output hit the budget.
    assert all(isinstance(t, Truncated) for t in out)


def test_local_hf_teacher_is_placed_on_the_given_device_in_eval_mode(tiny_model_dir):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = HFGenerator(str(tiny_model_dir), max_new_tokens=2, temperature=0.0, device=device, dtype=torch.float16)
    params = list(teacher.model.parameters())
    assert {p.device.type for p in params} == {device.type} and {p.dtype for p in params} == {torch.float16}
    assert not teacher.model.training and not any(p.requires_grad for p in params)
    assert len(teacher(["a"])) == 1  # generates where it lives


def test_trainer_sends_syntheses_to_the_teacher(tiny_model_dir, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="teacher", teacher_model=str(tiny_model_dir))
    assert isinstance(trainer._teacher, HFGenerator)
    # The teacher lives on this process's device, in the precision the policy computes in (bf16 under mixed precision).
    assert trainer._teacher.model.device == trainer.accelerator.device
    assert trainer.args.bf16 and trainer._teacher.model.dtype == torch.bfloat16
    asked = []
    trainer._teacher = lambda messages: asked.extend(messages) or [synthesis_for(m) for m in messages]
    out = generation_batch(trainer)
    assert len(asked) == 4 and all("<analysis>" in m for m in asked)
    assert int(out["constructed_rows"].sum()) == 4
    assert trainer._metrics["train"]["tapo/constructions_accepted"] == [4.0]
