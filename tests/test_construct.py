"""Constructors: splice / synthesis-writer dispatch, the local HF teacher, and the OpenAI-compatible endpoint teacher
(against a real HTTP server on 127.0.0.1), plus the trainer's teacher wiring."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from scripted import generation_batch, synthesis_for
from tapo.construct import (ConstructionError, ConstructionRequest, HFGenerator, OpenAIChatGenerator, Truncated,
                            construct)
from tapo.core.verify import is_correct

WRONG = "23 + 45 = 63\n63 - 12 = 51\nThe answer is \\boxed{51}"
RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"
REQUEST = ConstructionRequest("23 + 45 - 12", WRONG, RIGHT, "56")


def test_splice_needs_no_generator_and_builds_a_correct_trajectory():
    [built] = construct([REQUEST], "splice")
    assert built.parsed and built.raw is None
    prefix, reflection, _ = built.trajectory.parts()
    assert WRONG.startswith(prefix) and "wrong" in reflection.lower() and is_correct(built.trajectory.text, "56")


def test_splice_appends_the_gold_answer_when_the_reference_states_none():
    unboxed = ConstructionRequest("23 + 45 - 12", WRONG, "23 + 45 = 68\n68 - 12 = 56", "56")
    [built] = construct([unboxed], "splice")
    assert built.trajectory.text.endswith("\\boxed{56}.") and is_correct(built.trajectory.text, "56")


def test_a_writer_returning_the_wrong_number_of_texts_is_an_error():
    with pytest.raises(ValueError):
        construct([REQUEST, REQUEST], "teacher", lambda messages: [synthesis_for(messages[0])])


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
    null_content = False  # reply with "content": null, as some endpoints do for an empty answer

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.path, self.headers["Authorization"], body, self.headers["Content-Type"]))
        # Like an endpoint whose budget is too small for the synthesis: it stops at max_tokens, finish_reason "length".
        finish_reason = "length" if body["max_tokens"] < 32 else "stop"
        content = None if self.null_content else synthesis_for(body["messages"][0]["content"])
        reply = {"choices": [{"message": {"content": content}, "finish_reason": finish_reason}]}
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
    path, auth, body, content_type = _ChatHandler.seen[-2]
    assert path == "/v1/chat/completions" and auth == "Bearer secret" and content_type == "application/json"
    assert body == {"model": "teacher-model", "messages": [{"role": "user", "content": body["messages"][0]["content"]}],
                    "max_tokens": 64, "temperature": 0.7}
    assert "23 + 45 - 12" in body["messages"][0]["content"]
    assert built.parsed and is_correct(built.trajectory.text, "56") and not built.truncated
    assert cut_short.truncated and _ChatHandler.seen[-1][2]["max_tokens"] == 8


def test_openai_teacher_defaults_and_a_null_answer(monkeypatch):
    """Defaults: the key comes from OPENAI_API_KEY (none set: an empty bearer token, not "None"), 1024 tokens at
    temperature 0.7. A null answer is an empty synthesis text (unparsed), not a crash."""
    server = HTTPServer(("127.0.0.1", 0), type("NullChat", (_ChatHandler,), {"null_content": True}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        monkeypatch.setenv("OPENAI_API_KEY", "from-default-env")
        [built] = construct([REQUEST], "teacher", OpenAIChatGenerator(url, "m"))
        _, auth, body, _ = _ChatHandler.seen[-1]
        assert auth == "Bearer from-default-env" and body["max_tokens"] == 1024 and body["temperature"] == 0.7
        assert not built.parsed and built.raw == ""
        monkeypatch.delenv("OPENAI_API_KEY")
        OpenAIChatGenerator(url, "m")(["hi"])
        assert _ChatHandler.seen[-1][1] == "Bearer "
    finally:
        server.shutdown()


def test_a_silent_endpoint_fails_the_construction_after_timeout_s():
    """An endpoint that accepts the connection but never answers must not hang training: timeout_s bounds it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever reads or replies
        teacher = OpenAIChatGenerator(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m", timeout_s=0.5)
        [built] = construct([REQUEST], "teacher", teacher)
    assert not built.parsed and built.raw.startswith("[teacher request failed")


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


def test_local_hf_teacher_prompts_and_sampling_settings(tiny_model_dir, monkeypatch):
    """What the HF teacher feeds `generate`: each message as one user turn of the chat template with the assistant
    header and no added special tokens; greedy at temperature 0, sampling at the given temperature otherwise; the
    pad token; and it decodes only the new tokens, without special tokens."""
    teacher = HFGenerator(str(tiny_model_dir), max_new_tokens=3, temperature=0.0, batch_size=2)
    tok, real_generate, seen = teacher.tokenizer, teacher.model.generate, []

    def generate(**kwargs):
        seen.append(kwargs)
        ids = real_generate(**kwargs)
        return torch.cat([ids, torch.full((ids.shape[0], 1), tok.eos_token_id)], dim=1)  # end with a special token

    monkeypatch.setattr(teacher.model, "generate", generate)
    messages = ["a", "bb", "ccc"]
    out = teacher(messages)
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
               for m in messages]
    fed = [ids[mask.bool()].tolist() for kw in seen for ids, mask in zip(kw["input_ids"], kw["attention_mask"])]
    assert fed == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [(kw["max_new_tokens"], kw["do_sample"], kw["temperature"], kw["pad_token_id"]) for kw in seen] == \
        [(3, False, None, tok.pad_token_id)] * 2
    assert len(out) == 3 and not any(tok.eos_token in t for t in out)
    teacher.temperature = 0.7
    teacher(["a"])
    assert (seen[-1]["do_sample"], seen[-1]["temperature"]) == (True, 0.7)


def test_trainer_sends_syntheses_to_the_teacher(tiny_model_dir, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="teacher", teacher_model=str(tiny_model_dir))
    assert isinstance(trainer._teacher, HFGenerator)
    # The teacher lives on this process's device, in the precision the policy computes in (bf16 under mixed precision).
    assert trainer._teacher.model.device == trainer.accelerator.device
    assert trainer.args.bf16 and trainer._teacher.model.dtype == torch.bfloat16
    # It samples at the rollout temperature within the synthesis budget.
    assert (trainer._teacher.temperature, trainer._teacher.max_new_tokens) == \
        (trainer.args.temperature, trainer.args.synthesis_max_tokens)
    asked = []
    trainer._teacher = lambda messages: asked.extend(messages) or [synthesis_for(m) for m in messages]
    out = generation_batch(trainer)
    assert len(asked) == 4 and all("<analysis>" in m for m in asked)
    assert int(out["constructed_rows"].sum()) == 4
    assert trainer._metrics["train"]["tapo/constructions_accepted"] == [4.0]


def test_without_mixed_precision_the_teacher_runs_in_the_policys_dtype(tiny_model_dir, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="teacher", teacher_model=str(tiny_model_dir), bf16=False)
    assert trainer._teacher.model.dtype == torch.float32
    trainer.model.double()
    assert trainer._teacher_dtype() == torch.float64  # the policy's parameter dtype, whatever it is


def test_trainer_builds_an_endpoint_teacher_with_its_settings(tiny_model_dir, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="teacher", teacher_model="judge-7b",
                           teacher_base_url="http://127.0.0.1:9/v1", temperature=0.6, synthesis_max_tokens=77)
    teacher = trainer._teacher
    assert isinstance(teacher, OpenAIChatGenerator) and teacher.model == "judge-7b"
    assert (teacher.temperature, teacher.max_tokens) == (0.6, 77)


def test_a_failing_writer_stops_training_with_an_error_that_names_the_constructor_and_process(tiny_model_dir, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="teacher", teacher_model=str(tiny_model_dir))

    def broken(messages):
        raise RuntimeError("endpoint said no")

    trainer._teacher = broken
    expected = r"constructor='teacher' failed on 1 of 1 processes \(rank 0: RuntimeError: endpoint said no\)"
    with pytest.raises(ConstructionError, match=expected) as caught:
        generation_batch(trainer)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_trainer_places_a_local_teacher_on_its_own_process_device(tiny_model_dir, tmp_path, monkeypatch):
    """Under a multi-GPU launch each process's teacher must sit on that process's GPU: the trainer passes its
    accelerator's device rather than letting the teacher pick one (on this CPU both would be the CPU)."""
    from test_trainer import make_trainer

    built = []
    monkeypatch.setattr("tapo.trainer.HFGenerator", lambda *args, **kwargs: built.append(kwargs) or object())
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="teacher", teacher_model=str(tiny_model_dir))
    [kwargs] = built
    assert kwargs["device"] == trainer.accelerator.device and kwargs["dtype"] == torch.bfloat16
