"""Phase 6.02: the OpenAI-compatible server answers through the `openai` client, refuses bad
requests with 4xx, and `serve --backend vllm` launches vLLM with this model's arguments."""
from __future__ import annotations

import json
import stat
import sys
from dataclasses import replace

import pytest

from config.training_config import DeployConfig
from kormedgemma.serve import (ServeError, ServerProcess, build_app, free_port, port_in_use, server_command,
                               vllm_command)


@pytest.fixture(scope="module")
def client(tiny_phase6):
    from fastapi.testclient import TestClient

    from kormedgemma.evaluate import load_for_eval

    config, out, _ = tiny_phase6
    model, tokenizer = load_for_eval(out, device="cpu")
    app = build_app(model, tokenizer, "korean-medgemma", max_model_len=256, default_max_tokens=8)
    return TestClient(app), tokenizer


def _chat(client, **body):
    body = {"model": "korean-medgemma", "messages": [{"role": "user", "content": "두통의 원인은?"}], **body}
    return client.post("/v1/chat/completions", json=body)


def test_chat_completion_is_greedy_and_counts_its_tokens(client):
    http, tokenizer = client
    first = _chat(http, max_tokens=6).json()
    second = _chat(http, max_tokens=6).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]  # temperature 0
    usage = first["usage"]
    assert usage["completion_tokens"] <= 6 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "두통의 원인은?"}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert usage["prompt_tokens"] == len(prompt)
    if first["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == 6


def test_streamed_chunks_join_to_the_non_streamed_answer(client):
    http, _ = client
    whole = _chat(http, max_tokens=6).json()["choices"][0]
    plain = whole["message"]["content"]
    response = _chat(http, max_tokens=6, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain


@pytest.mark.parametrize("body, status, words", [
    ({"messages": []}, 400, "messages is empty"),
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "가 " * 600}]}, 400, "maximum context length"),
    ({"max_tokens": 250}, 400, "exceeds the maximum context length"),
    ({"messages": [{"role": "doctor", "content": "x"}]}, 400, "invalid request"),
    ({"temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "must alternate"),
])
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(client, body, status, words):
    http, _ = client
    response = _chat(http, **body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert _chat(http, max_tokens=2).status_code == 200


def test_models_lists_the_served_name(client):
    http, _ = client
    data = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["korean-medgemma"] and data[0]["max_model_len"] == 256


def test_serve_check_answers_a_korean_question_over_http_and_stops_the_server(tiny_phase6):
    from kormedgemma.serve import serve_check

    config, _, _ = tiny_phase6
    port = free_port()
    config = replace(config, deploy=replace(config.deploy, port=port))
    out = serve_check(config)
    check = json.loads((out / "check.json").read_text(encoding="utf-8"))
    assert check["models"] == [config.deploy.served_model_name]
    assert check["question"] == config.deploy.check_question and isinstance(check["answer"], str)
    assert 1 <= check["completion_tokens"] <= config.deploy.check_max_tokens
    assert check["latency_s"] > 0 and check["streamed"]["first_token_s"] is not None
    assert [r["status"] for r in check["bad_requests"]] == [400, 404, 400]
    assert not port_in_use("127.0.0.1", port)  # stopped


def test_vllm_command_carries_the_model_settings(tiny_phase6):
    _, out, _ = tiny_phase6
    deploy = DeployConfig(max_model_len=8192, max_num_seqs=16, gpu_memory_utilization=0.9, port=8123)
    command = vllm_command(out, deploy, "vllm")
    pairs = dict(zip(command[3::2], command[4::2]))
    assert command[:3] == ["vllm", "serve", str(out)]
    assert pairs["--quantization"] == "compressed-tensors" and pairs["--max-model-len"] == "8192"
    assert pairs["--max-num-seqs"] == "16" and pairs["--gpu-memory-utilization"] == "0.9"
    assert pairs["--served-model-name"] == "korean-medgemma" and pairs["--port"] == "8123"
    assert pairs["--chat-template"] == str(out / "chat_template.jinja")


def test_vllm_backend_without_vllm_names_make_serve_env(tiny_phase6, monkeypatch):
    import kormedgemma.serve as serve

    _, out, _ = tiny_phase6
    monkeypatch.setattr(serve, "find_vllm", lambda: None)
    with pytest.raises(ServeError, match="make serve-env"):
        server_command(out, DeployConfig(), "vllm", "127.0.0.1", 8000)


def test_vllm_launcher_waits_for_health_with_the_arguments_given(tiny_phase6, tmp_path, monkeypatch):
    """A stand-in `vllm` records its arguments and answers /health: the launcher's contract."""
    import kormedgemma.serve as serve

    _, out, _ = tiny_phase6
    record = tmp_path / "args.json"
    fake = tmp_path / "vllm"
    fake.write_text(f"""#!{sys.executable}
import json, sys, http.server
args = sys.argv[1:]
json.dump(args, open({str(record)!r}, "w"))
port = int(args[args.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(serve, "find_vllm", lambda: str(fake))
    monkeypatch.setattr(serve.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    port = free_port()
    command = server_command(out, DeployConfig(max_model_len=4096), "vllm", "127.0.0.1", port)
    with ServerProcess(command, f"http://127.0.0.1:{port}", 30, tmp_path / "vllm.log") as server:
        assert server.startup_s is not None
    args = json.loads(record.read_text())
    assert args[:2] == ["serve", str(out)] and args[args.index("--max-model-len") + 1] == "4096"
    assert not port_in_use("127.0.0.1", port)


def test_a_server_that_dies_at_start_gives_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('CUDA out of memory while loading'); sys.exit(3)"]
    with pytest.raises(ServeError, match="(?s)exited with code 3.*CUDA out of memory"):
        with ServerProcess(command, f"http://127.0.0.1:{free_port()}", 30, tmp_path / "log.txt"):
            pass


def test_serve_cli_refuses_a_folder_without_a_model(tmp_path, capsys):
    from kormedgemma.cli import main

    assert main(["serve", "--model", str(tmp_path), "--backend", "transformers"]) == 2
    assert "no config.json" in capsys.readouterr().err
