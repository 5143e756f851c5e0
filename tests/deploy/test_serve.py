"""Phase 6.02: the OpenAI-compatible server answers through the `openai` client, refuses bad
requests with 4xx, `serve --backend vllm` launches vLLM with this model's arguments, and with an
API key in the environment both servers require it (and refuse to leave loopback without one)."""
from __future__ import annotations

import http.server
import json
import socket
import stat
import sys
import threading
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from config.training_config import ConfigError, DeployConfig
from kormedgemma.deploy.serve import (
    ServeError,
    ServerProcess,
    build_app,
    free_port,
    is_loopback,
    server_command,
    server_env,
    serves_port,
    vllm_command,
)

KEY = "test-key-Zq8v3LxN0pRw"  # a stand-in secret: the tests look for it where it must never be


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@pytest.fixture(scope="module")
def loaded(tiny_phase6):
    from kormedgemma.evaluation.korean import load_for_eval

    _, out, _ = tiny_phase6
    return load_for_eval(out, device="cpu")


@pytest.fixture(scope="module")
def client(loaded):
    from fastapi.testclient import TestClient

    model, tokenizer = loaded
    app = build_app(model, tokenizer, "korean-medgemma", max_model_len=256, default_max_tokens=8)
    return TestClient(app), tokenizer


@pytest.fixture(scope="module")
def keyed(loaded):
    from fastapi.testclient import TestClient

    model, tokenizer = loaded
    return TestClient(build_app(model, tokenizer, "korean-medgemma", max_model_len=256, default_max_tokens=8,
                                api_key=KEY))


def _chat(client, headers=None, **body):
    body = {"model": "korean-medgemma", "messages": [{"role": "user", "content": "두통의 원인은?"}], **body}
    return client.post("/v1/chat/completions", json=body, headers=headers)


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


@pytest.mark.parametrize("headers, words", [
    ({}, "requires an API key"),
    ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
    ({"Authorization": f"Bearer {KEY}x"}, "invalid API key"),
    ({"Authorization": f"Basic {KEY}"}, "invalid API key"),
    ({"Authorization": KEY}, "invalid API key"),
])
def test_with_a_key_requests_without_it_or_with_a_wrong_one_get_401(keyed, headers, words):
    for response in (_chat(keyed, max_tokens=2, headers=headers), keyed.get("/v1/models", headers=headers),
                     keyed.get("/docs", headers=headers), keyed.get("/no-such-path", headers=headers)):
        assert response.status_code == 401, response.request.url
        error = response.json()["error"]
        assert words in error["message"] and error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEY not in response.text


def test_with_the_right_key_the_server_answers_and_health_needs_none(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    response = _chat(keyed, max_tokens=2, headers=auth)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2
    assert keyed.get("/v1/models", headers=auth).json()["data"][0]["id"] == "korean-medgemma"
    assert _chat(keyed, stream=True, max_tokens=2, headers=auth).text.rstrip().endswith("data: [DONE]")
    assert _chat(keyed, messages=[], headers=auth).status_code == 400  # past the key, the request is judged
    assert keyed.get("/health").json() == {"status": "ok"}  # what load balancers and wait_healthy poll


def test_without_a_key_on_loopback_the_server_stays_open(client):
    http, _ = client
    assert _chat(http, max_tokens=2).status_code == 200 and http.get("/v1/models").status_code == 200


@pytest.mark.parametrize("host, inside", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                          ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                          ("192.168.0.10", False), ("gpu-box.lan", False)])
def test_only_loopback_counts_as_inside(host, inside):
    assert is_loopback(host) is inside


def test_a_host_beyond_loopback_without_a_key_is_refused_before_starting(tiny_phase6, tmp_path, monkeypatch, capsys):
    import kormedgemma.deploy.serve as serve
    from kormedgemma.cli import main

    _, out, _ = tiny_phase6
    monkeypatch.delenv("KORMEDGEMMA_API_KEY", raising=False)
    refusal = r"refusing to serve on '0\.0\.0\.0' without an API key(?s:.*)KORMEDGEMMA_API_KEY"
    with pytest.raises(ServeError, match=refusal):
        vllm_command(out, DeployConfig(host="0.0.0.0"), "vllm")
    with pytest.raises(ServeError, match=refusal):
        vllm_command(out, DeployConfig(), "vllm", host="0.0.0.0")
    # Refused before the model is loaded: this folder has no model, so loading would fail differently.
    with pytest.raises(ServeError, match=refusal):
        serve.serve_transformers(tmp_path / "not-loaded", DeployConfig(), host="0.0.0.0")
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve", "--model", str(tmp_path), "--backend", "transformers", "--host", "0.0.0.0"]) == 2
    assert "KORMEDGEMMA_API_KEY" in capsys.readouterr().err
    # The config may name another variable; the message names that one.
    with pytest.raises(ServeError, match="MY_SERVE_KEY"):
        vllm_command(out, DeployConfig(api_key_env="MY_SERVE_KEY"), "vllm", host="10.0.0.5")
    monkeypatch.setenv("KORMEDGEMMA_API_KEY", KEY)
    assert KEY not in " ".join(vllm_command(out, DeployConfig(host="0.0.0.0"), "vllm"))


def test_the_key_is_read_from_the_environment_only(tiny_phase6, monkeypatch):
    with pytest.raises(ConfigError, match="api_key_env") as refused:
        DeployConfig(api_key_env=KEY + "!")  # the key pasted where the variable's name belongs
    assert KEY not in str(refused.value)
    monkeypatch.setenv("KORMEDGEMMA_API_KEY", "has a space " + KEY)
    with pytest.raises(ServeError, match="KORMEDGEMMA_API_KEY") as bad:
        server_env(DeployConfig())
    assert KEY not in str(bad.value)
    monkeypatch.setenv("KORMEDGEMMA_API_KEY", KEY)
    assert server_env(DeployConfig())["VLLM_API_KEY"] == KEY
    monkeypatch.delenv("KORMEDGEMMA_API_KEY")
    monkeypatch.setenv("VLLM_API_KEY", "stray")  # not configured here, so not enforced either
    assert "VLLM_API_KEY" not in server_env(DeployConfig())
    _, out, _ = tiny_phase6
    command = server_command(out, DeployConfig(api_key_env="MY_SERVE_KEY"), "transformers", "127.0.0.1", 8000)
    assert "deploy.api_key_env=MY_SERVE_KEY" in command  # the child reads the same variable


def test_serve_check_answers_a_korean_question_over_http_and_stops_the_server(tiny_phase6, monkeypatch):
    """With a key set, as a server shared with colleagues would be: the check still gets its answer,
    the server refuses requests without the key, and the key is in none of the files written."""
    from kormedgemma.deploy.serve import serve_check

    config, _, _ = tiny_phase6
    monkeypatch.setenv(config.deploy.api_key_env, KEY)
    with socket.socket() as taken:  # deploy.port held by someone else, listening but never answering
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = replace(config, deploy=replace(config.deploy, port=taken.getsockname()[1]))
        out = serve_check(config)
    check = json.loads((out / "check.json").read_text(encoding="utf-8"))
    assert check["models"] == [config.deploy.served_model_name]
    assert check["question"] == config.deploy.check_question and isinstance(check["answer"], str)
    assert 1 <= check["completion_tokens"] <= config.deploy.check_max_tokens
    assert check["latency_s"] > 0 and check["streamed"]["first_token_s"] is not None
    assert [(r["request"], r["status"]) for r in check["bad_requests"]] == [
        ("empty messages", 400), ("unknown model", 404), ("over-long prompt", 400), ("no API key", 401),
        ("wrong API key", 401)]
    assert check["api_key_required"] is True
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"check.json", "server.log"} <= {p.name for p in written}
    assert not [p for p in written if KEY.encode() in p.read_bytes()]
    assert not port_in_use("127.0.0.1", urlsplit(check["url"]).port)  # stopped


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
    import kormedgemma.deploy.serve as serve

    _, out, _ = tiny_phase6
    monkeypatch.setattr(serve, "find_vllm", lambda: None)
    with pytest.raises(ServeError, match="make serve-env"):
        server_command(out, DeployConfig(), "vllm", "127.0.0.1", 8000)


def test_vllm_launcher_waits_for_health_with_the_arguments_given(tiny_phase6, tmp_path, monkeypatch):
    """A stand-in `vllm` records its arguments and answers /health: the launcher's contract. The
    API key reaches it as VLLM_API_KEY in its environment, never on its (printed, logged) command line."""
    import kormedgemma.deploy.serve as serve

    _, out, _ = tiny_phase6
    record = tmp_path / "args.json"
    fake = tmp_path / "vllm"
    fake.write_text(f"""#!{sys.executable}
import json, sys, http.server
import os
args = sys.argv[1:]
json.dump({{"args": args, "key": os.environ.get("VLLM_API_KEY")}}, open({str(record)!r}, "w"))
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
    monkeypatch.setenv("KORMEDGEMMA_API_KEY", KEY)
    port = free_port()
    deploy = DeployConfig(max_model_len=4096)
    command = server_command(out, deploy, "vllm", "0.0.0.0", port)  # beyond loopback: allowed with a key
    with ServerProcess(command, f"http://127.0.0.1:{port}", 30, tmp_path / "vllm.log", env=server_env(deploy)) as server:
        assert server.startup_s is not None
    seen = json.loads(record.read_text())
    args = seen["args"]
    assert args[:2] == ["serve", str(out)] and args[args.index("--max-model-len") + 1] == "4096"
    assert seen["key"] == KEY and not any(KEY in a for a in command + args) and "--api-key" not in args
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


def test_a_port_answered_by_another_process_is_refused_not_checked(tmp_path):
    """Two runs reaching 6.02 together both found the port free; the server that lost the bind was
    "healthy" through the other run's server, whose model the check then asked and recorded."""
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's spelling)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    foreign = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    port = foreign.server_address[1]
    slow_to_bind = [sys.executable, "-c", "import time; print('still loading the model'); time.sleep(60)"]
    server = ServerProcess(slow_to_bind, f"http://127.0.0.1:{port}", 30, tmp_path / "log.txt")
    try:
        with pytest.raises(ServeError, match="not from the server just started: another process listens"):
            with server:
                pass
        assert server.process is not None and server.process.poll() is not None  # stopped, not left running
    finally:
        foreign.shutdown()
        foreign.server_close()


def test_a_server_that_listens_from_a_child_process_is_its_own(tmp_path):
    """vLLM's launcher may serve from a process it starts: the listening socket of any descendant counts."""
    port = free_port()
    server = (f"import http.server\n"
              f"class H(http.server.BaseHTTPRequestHandler):\n"
              f"    def do_GET(self): self.send_response(200); self.end_headers()\n"
              f"    def log_message(self, *a): pass\n"
              f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    launcher = [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {server!r}])"]
    with ServerProcess(launcher, f"http://127.0.0.1:{port}", 30, tmp_path / "log.txt") as started:
        assert started.startup_s is not None
        assert serves_port(started.process.pid, port) is True
    assert serves_port(started.process.pid, port) is False  # the launcher is gone
