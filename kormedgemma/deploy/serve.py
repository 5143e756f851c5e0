"""Phase 6.02: serve the 4-bit model over the OpenAI chat API, and ask it a question.

Two backends behind one command (`python -m kormedgemma serve`):

- `vllm` (the GPU box): vLLM's own OpenAI-compatible server, started with the arguments this
  model needs. vLLM pins its own torch, so it lives in a separate environment (`make serve-env`,
  `.venv-serve/`); this module only launches its `vllm` executable and waits for `/health`.
- `transformers` (CPU, the tiny profile, or a box without vLLM): a small FastAPI app over
  `model.generate` with `/v1/models`, `/v1/chat/completions` (streaming too) and `/health`.
  `transformers serve` was not used: it serves any Hub model on demand, and the point here is
  one fixed folder with the same request limits vLLM applies.

Either way clients talk to `http://host:port/v1` with the `openai` package.

Access: both bind 127.0.0.1 by default. With an API key in the environment variable that
`deploy.api_key_env` names (`KORMEDGEMMA_API_KEY`), both require `Authorization: Bearer <key>`
on everything but `/health`; binding any other host without a key is refused before starting,
since the model would otherwise answer anyone who can reach the machine. The key is only ever
read from the environment and handed on through the environment (vLLM reads `VLLM_API_KEY`),
so it never reaches a command line, a log, the config, a manifest or an error message.
(No `from __future__ import annotations` here: FastAPI reads the request model from the
endpoint's annotation at definition time, and the models are local to `build_app`.)
"""

import hmac
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch

from config.training_config import DeployConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.config import repo_root
from kormedgemma.core.errors import UserError
from kormedgemma.core.io import write_json
from kormedgemma.core.manifest import write_artifact
from kormedgemma.evaluation.decoding import MaskRowsPast, stop_token_ids
from kormedgemma.modeling.base_model import load_for_eval


class ServeError(UserError, RuntimeError):
    """The server cannot start or did not come up; the message says why and what to do."""


# --------------------------------------------------------------------------- API key

def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach: `localhost` and loopback addresses
    (127.0.0.0/8, ::1). `0.0.0.0`, `::`, LAN addresses and other names are reachable from outside."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it counts as outside


def api_key(deploy: DeployConfig) -> Optional[str]:
    """The API key from the environment variable `deploy.api_key_env` names, or None when unset/empty.

    It must be printable ASCII without spaces, as HTTP headers carry it; the error names the
    variable, never the value."""
    key = os.environ.get(deploy.api_key_env, "").strip()
    if not key:
        return None
    if not (key.isascii() and key.isprintable() and " " not in key):
        raise ServeError(f"the API key in ${deploy.api_key_env} must be printable ASCII without spaces; make one with "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return key


def require_key_for(host: str, deploy: DeployConfig) -> Optional[str]:
    """The API key to serve on `host` with (None: open, loopback only).

    A non-loopback host without a key is refused: it would expose the model, unauthenticated, to
    everyone who can reach this machine."""
    key = api_key(deploy)
    if key is None and not is_loopback(host):
        name = deploy.api_key_env
        raise ServeError(f"refusing to serve on {host!r} without an API key: anyone who can reach this machine "
                         f"could use the model. Set one in the environment variable {name} (e.g. "
                         f"export {name}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')) and give "
                         f"it to your clients, who send 'Authorization: Bearer <key>'; or serve on 127.0.0.1 "
                         f"(deploy.api_key_env names a different variable if you need one)")
    return key


def server_env(deploy: DeployConfig, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for a server child process: the key reaches vLLM as `VLLM_API_KEY` (the
    transformers child reads `deploy.api_key_env` itself) instead of `--api-key` on its command
    line, which vLLM would log and `serve_check` records. A stray `VLLM_API_KEY` is dropped when
    no key is configured, so the server enforces exactly what the client sends."""
    env = dict(os.environ if base is None else base)
    key = api_key(deploy)
    env.pop("VLLM_API_KEY", None)
    if key is not None:
        env["VLLM_API_KEY"] = key
    return env


# --------------------------------------------------------------------------- vLLM

def quantization_method(model_dir: Path) -> Optional[str]:
    """vLLM's `--quantization` value for a folder: compressed-tensors (llm-compressor) or awq."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    method = (config.get("quantization_config") or {}).get("quant_method")
    return {"compressed-tensors": "compressed-tensors", "awq": "awq"}.get(method or "", method)


def find_vllm() -> Optional[str]:
    """The `vllm` executable: on PATH, or in the serving environment `make serve-env` builds."""

    found = shutil.which("vllm")
    if found:
        return found
    local = repo_root() / ".venv-serve" / "bin" / "vllm"
    return str(local) if local.is_file() else None


def vllm_command(model_dir: Path, deploy: DeployConfig, executable: str = "vllm", host: Optional[str] = None,
                 port: Optional[int] = None) -> list[str]:
    """`vllm serve …` for this model: its chat template, context length, concurrency, memory share,
    quantisation format, and the name clients ask for.

    The API key is deliberately not here (the command is printed and kept in check.json): it
    travels in the child's environment, see `server_env`. A non-loopback host without one is refused."""
    model_dir = Path(model_dir)
    host = host or deploy.host
    require_key_for(host, deploy)
    command = [executable, "serve", str(model_dir), "--served-model-name", deploy.served_model_name,
               "--host", host, "--port", str(port or deploy.port),
               "--max-model-len", str(deploy.max_model_len), "--max-num-seqs", str(deploy.max_num_seqs),
               "--gpu-memory-utilization", str(deploy.gpu_memory_utilization), "--dtype", "bfloat16"]
    method = quantization_method(model_dir)
    if method:
        command += ["--quantization", method]
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        command += ["--chat-template", str(template)]
    return command


# --------------------------------------------------------------------------- transformers app

def _text_of(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def build_app(model: Any, tokenizer: Any, model_name: str, max_model_len: int,
              default_max_tokens: int = 512, api_key: Optional[str] = None) -> Any:
    """A FastAPI app answering OpenAI chat requests with `model.generate`, one request at a time.

    Errors follow vLLM's shape (`{"error": {"message", "type", "code"}}`, HTTP 4xx): an empty
    `messages`, an unknown `model`, a prompt + `max_tokens` past `max_model_len`, or messages the
    chat template refuses are the client's mistake, not a crash of the server.

    With `api_key`, every path but `/health` (which load balancers and `wait_healthy` poll)
    needs `Authorization: Bearer <api_key>`, else HTTP 401; the check is an ASGI middleware, so
    it also covers unknown paths and /docs, and compares in constant time.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field
    from transformers import GenerationConfig, LogitsProcessorList, TextIteratorStreamer


    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: Union[str, list[dict[str, Any]]]

    class ChatRequest(BaseModel):
        model: str
        messages: list[Message]
        max_tokens: Optional[int] = Field(default=None, ge=1)
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: float = Field(default=0.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        stream: bool = False
        seed: Optional[int] = None

    class ClientError(Exception):
        def __init__(self, status: int, message: str, code: str) -> None:
            super().__init__(message)
            self.status, self.message, self.code = status, message, code

    app = FastAPI(title="Korean MedGemma (transformers backend)")
    if api_key is not None:
        app.add_middleware(_RequireBearer, key=api_key)
    lock = threading.Lock()
    device = next(model.parameters()).device
    created = int(time.time())

    def error(status: int, message: str, code: str) -> JSONResponse:
        kind = "NotFoundError" if status == 404 else "BadRequestError"
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})

    @app.exception_handler(ClientError)
    async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
        return error(exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error(400, f"invalid request: {problems}", "invalid_request")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "kormedgemma", "max_model_len": max_model_len}]}

    def prepare(request: ChatRequest) -> tuple[torch.Tensor, GenerationConfig]:
        if request.model != model_name:
            raise ClientError(404, f"model {request.model!r} does not exist; this server serves {model_name!r}",
                              "model_not_found")
        if not request.messages:
            raise ClientError(400, "messages is empty: send at least one user message", "invalid_request")
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in request.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")["input_ids"]
        except Exception as exc:  # the template's own checks (role order, …) are the client's problem
            raise ClientError(400, f"the chat template refused these messages: {exc}", "invalid_messages") from exc
        prompt = ids.shape[1]
        wanted = request.max_completion_tokens or request.max_tokens
        if prompt >= max_model_len:
            raise ClientError(400, f"the prompt is {prompt} tokens; this model's maximum context length is "
                                   f"{max_model_len}. Shorten the messages.", "context_length_exceeded")
        if wanted is not None and prompt + wanted > max_model_len:
            raise ClientError(400, f"prompt ({prompt} tokens) + max_tokens ({wanted}) exceeds the maximum context "
                                   f"length {max_model_len}; lower max_tokens", "context_length_exceeded")
        budget = wanted or min(default_max_tokens, max_model_len - prompt)
        sampling = request.temperature > 0
        settings = GenerationConfig(max_new_tokens=budget, do_sample=sampling, eos_token_id=stop_token_ids(tokenizer),
                                    pad_token_id=tokenizer.pad_token_id,
                                    **({"temperature": request.temperature, "top_p": request.top_p} if sampling else {}))
        if request.seed is not None:
            torch.manual_seed(request.seed)
        return ids.to(device), settings

    processors = LogitsProcessorList([MaskRowsPast(len(tokenizer))])

    def finish_reason(new_ids: Sequence[int], budget: int) -> str:
        return "stop" if new_ids and new_ids[-1] in stop_token_ids(tokenizer) else ("length" if len(new_ids) >= budget else "stop")

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> Any:
        ids, settings = prepare(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if request.stream:
            return StreamingResponse(stream(ids, settings, request_id), media_type="text/event-stream")
        with lock, torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings,
                                       logits_processor=processors)
        new = generated[0, ids.shape[1]:].tolist()
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": tokenizer.decode(new, skip_special_tokens=True)},
                             "finish_reason": finish_reason(new, settings.max_new_tokens)}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                          "total_tokens": ids.shape[1] + len(new)}}

    def stream(ids: torch.Tensor, settings: GenerationConfig, request_id: str) -> Iterator[str]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        produced: list[list[int]] = []

        def run() -> None:
            with lock, torch.no_grad():
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings,
                                        logits_processor=processors, streamer=streamer)
            produced.append(output[0, ids.shape[1]:].tolist())

        worker = threading.Thread(target=run, daemon=True)
        worker.start()

        def chunk(delta: dict[str, Any], reason: Optional[str] = None) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for text in streamer:
            if text:
                yield chunk({"content": text})
        worker.join()
        yield chunk({}, finish_reason(produced[0], settings.max_new_tokens) if produced else "stop")
        yield "data: [DONE]\n\n"

    return app


class _RequireBearer:
    """ASGI middleware: HTTP requests other than `/health` need `Authorization: Bearer <key>`.

    The answer to a missing or wrong key is the same OpenAI-style 401 and never echoes what was
    sent; `hmac.compare_digest` keeps the comparison's time independent of how much matched."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode("ascii")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        sent = any(name == b"authorization" for name, _ in scope["headers"])
        message = ("invalid API key" if sent else
                   "this server requires an API key: send the header 'Authorization: Bearer <key>'")
        response = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                                content={"error": {"message": message, "type": "AuthenticationError",
                                                   "code": "invalid_api_key"}})
        await response(scope, receive, send)

    def _authorized(self, scope: Any) -> bool:
        ok = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return ok


def serve_transformers(model_dir: Path, deploy: DeployConfig, host: Optional[str] = None, port: Optional[int] = None,
                       device: Optional[str] = None) -> None:
    """Load the folder (4-bit compressed-tensors checkpoints are unpacked by transformers) and
    serve it until interrupted; a non-loopback host without an API key is refused before loading."""
    import uvicorn


    host = host or deploy.host
    key = require_key_for(host, deploy)
    model, tokenizer = load_for_eval(model_dir, device=device)
    app = build_app(model, tokenizer, deploy.served_model_name, deploy.max_model_len, api_key=key)
    uvicorn.run(app, host=host, port=port or deploy.port, log_level="warning")


# --------------------------------------------------------------------------- process control

def wait_healthy(url: str, timeout_s: float, process: Optional[subprocess.Popen] = None,
                 log: Optional[Path] = None) -> float:
    """Seconds until GET {url}/health answers 200; a clear error if the process dies or time runs out."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process is not None and process.poll() is not None:
            raise ServeError(f"the server exited with code {process.returncode} before it was healthy"
                             + _log_tail(log))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                healthy = response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            healthy = False
        if healthy and process is not None and serves_port(process.pid, urllib.parse.urlsplit(url).port) is False:
            if process.poll() is not None:
                continue  # it exited meanwhile: the loop's first check reports that, with its log
            # Two runs that reach 6.02 together both find the port free and both start a server;
            # the one that loses the bind would otherwise check, and record, the other's model.
            raise ServeError(f"{url} answers, but not from the server just started: another process listens "
                             "on that port. Stop it, or choose a free port (deploy.port, serve --port)."
                             + _log_tail(log))
        if healthy:
            return time.perf_counter() - started
        time.sleep(0.5)
    raise ServeError(f"the server at {url} was not healthy after {timeout_s:.0f} s "
                     "(raise deploy.startup_timeout_s if the model is still loading)" + _log_tail(log))


def serves_port(pid: int, port: Optional[int]) -> Optional[bool]:
    """Whether process `pid` or one of its descendants listens on TCP `port` (vLLM may serve from
    a child); None where the system will not say (another user's process, no /proc)."""
    import psutil  # here, not at the top: the vLLM environment has it only through vLLM

    if port is None:
        return None
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None
    for process in family:
        try:
            sockets = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:
            return None
        if any(s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port for s in sockets):
            return True
    return False


def _log_tail(log: Optional[Path], lines: int = 20) -> str:
    if log is None or not Path(log).is_file():
        return ""
    tail = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"\nlast lines of {log}:\n" + "\n".join(tail)


def free_port(host: str = "127.0.0.1") -> int:

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(model_dir: Path, deploy: DeployConfig, backend: str, host: str, port: int,
                   profile: str = "tiny", device: Optional[str] = None) -> list[str]:
    """The command that runs one server in the foreground (what `ServerProcess` launches)."""
    if backend == "vllm":
        executable = find_vllm()
        if executable is None:
            raise ServeError("vLLM is not installed: `make serve-env` builds .venv-serve/ with vLLM (it pins its "
                             "own torch, so it is not in .venv), or use --backend transformers")
        if not torch.cuda.is_available() and shutil.which("nvidia-smi") is None:
            raise ServeError("vLLM needs an NVIDIA GPU and none is visible; use --backend transformers on this machine")
        return vllm_command(model_dir, deploy, executable, host, port)
    if backend != "transformers":
        raise ServeError(f"unknown backend {backend!r}; use vllm or transformers")
    command = [sys.executable, "-m", "kormedgemma", "serve", "--model", str(model_dir), "--backend", "transformers",
               "--host", host, "--port", str(port), "--profile", profile,
               "--set", f"deploy.served_model_name={deploy.served_model_name}",
               "--set", f"deploy.max_model_len={deploy.max_model_len}",
               "--set", f"deploy.api_key_env={deploy.api_key_env}"]  # the variable's name, not the key
    return command + (["--device", device] if device else [])


class ServerProcess:
    """A server in a child process: `with ServerProcess(cmd, url, …) as server:` waits until it is
    healthy, and stops it (SIGTERM, then SIGKILL) on leaving, even after an error. `env` (default:
    this process's) is the child's environment; `server_env` adds the API key there."""

    def __init__(self, command: Sequence[str], url: str, timeout_s: float, log: Path,
                 env: Optional[Mapping[str, str]] = None) -> None:
        self.command, self.url, self.timeout_s, self.log = list(command), url, timeout_s, Path(log)
        self.env = dict(os.environ if env is None else env)
        self.process: Optional[subprocess.Popen] = None
        self.startup_s: Optional[float] = None

    def __enter__(self) -> "ServerProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log, "w", encoding="utf-8")
        env = {**self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        handle.close()
        try:
            self.startup_s = wait_healthy(self.url, self.timeout_s, self.process, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------- client

def openai_client(base_url: str, api_key: Optional[str] = None) -> Any:
    """An OpenAI client for the server; it sends `api_key` as the bearer token when there is one."""
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "not-needed", timeout=600, max_retries=0)


def ask(client: Any, model: str, question: str, max_tokens: int, system: Optional[str] = None) -> dict[str, Any]:
    """One chat question through the OpenAI client: answer, latency and token counts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    started = time.perf_counter()
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    latency = time.perf_counter() - started
    usage = response.usage
    return {"question": question, "answer": response.choices[0].message.content,
            "finish_reason": response.choices[0].finish_reason, "latency_s": round(latency, 3),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "tokens_per_second": round(usage.completion_tokens / latency, 2) if usage and latency > 0 else None}


def ask_streaming(client: Any, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    """The same question streamed: seconds to the first text chunk, and to the last."""
    started = time.perf_counter()
    first: Optional[float] = None
    parts: list[str] = []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    for event in stream:
        delta = event.choices[0].delta.content if event.choices else None
        if delta:
            first = first if first is not None else time.perf_counter() - started
            parts.append(delta)
    return {"answer": "".join(parts), "first_token_s": round(first, 3) if first is not None else None,
            "total_s": round(time.perf_counter() - started, 3), "chunks": len(parts)}


def check_bad_requests(base_url: str, model: str, max_model_len: int,
                       api_key: Optional[str] = None) -> list[dict[str, Any]]:
    """Send the three requests a server must refuse politely; (request, status, message) each.

    With `api_key` they carry it (so the refusals are about the request, not the key), and two
    more check the key is enforced: a valid request without it, and with a wrong one (401 each)."""
    valid = {"model": model, "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 1}
    cases = [("empty messages", {"model": model, "messages": []}, api_key),
             ("unknown model", {"model": "no-such-model", "messages": [{"role": "user", "content": "안녕"}]}, api_key),
             ("over-long prompt", {"model": model, "messages": [{"role": "user", "content": "가 " * (max_model_len * 2)}]},
              api_key)]
    if api_key:
        cases += [("no API key", valid, None), ("wrong API key", valid, "wrong-" + api_key)]
    results = []
    for name, body, key in cases:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, payload = response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read().decode()
        try:
            message = json.loads(payload).get("error", {}).get("message", payload)
        except (json.JSONDecodeError, AttributeError):
            message = payload
        results.append({"request": name, "status": status, "message": str(message)[:200]})
    return results


# --------------------------------------------------------------------------- pipeline step 6.02

def serve_check(config: Any, backend: Optional[str] = None, progress: bool = True) -> Path:
    """6.02: start the configured server on loopback, list its models, ask the check question,
    send the three bad requests, stop it, and keep what happened in models/final/serve_check/.

    With an API key in the environment the server enforces it and the client sends it; check.json
    records only whether one was required, and the refused requests include the two without it."""

    deploy = config.deploy
    backend = backend or deploy.serve_backend
    model_dir = require(config, "awq_model")
    host = "127.0.0.1"
    # a port the system hands out, not deploy.port: runs side by side on one machine (the method
    # and its baseline) reach 6.02 together, and both would find deploy.port free
    port = free_port(host)
    url = f"http://{host}:{port}"
    command = server_command(model_dir, deploy, backend, host, port, profile=config.profile)
    key = api_key(deploy)
    final = artifact_path(config, "serve_check")
    with write_artifact(final, "6.02", config, ["deploy"], {"awq_model": model_dir}) as out:
        with ServerProcess(command, url, deploy.startup_timeout_s, out.path / "server.log",
                           env=server_env(deploy)) as server:
            client = openai_client(url, key)
            served = [m.id for m in client.models.list().data]
            answer = ask(client, deploy.served_model_name, deploy.check_question, deploy.check_max_tokens)
            streamed = ask_streaming(client, deploy.served_model_name, deploy.check_question, deploy.check_max_tokens)
            refused = check_bad_requests(url, deploy.served_model_name, deploy.max_model_len, key)
        result = {"backend": backend, "command": command, "url": url, "api_key_required": key is not None,
                  "startup_s": round(server.startup_s or 0, 2),
                  "models": served, **answer, "streamed": streamed, "bad_requests": refused}
        write_json(out.path / "check.json", result)
        out.metrics.update({k: result[k] for k in ("backend", "startup_s", "latency_s", "completion_tokens", "answer")})
        out.metrics["first_token_s"] = streamed["first_token_s"]
        out.metrics["bad_request_statuses"] = [r["status"] for r in refused]
    return final


def serve_check_headline(metrics: dict[str, Any]) -> str:
    """6.02's line: the backend, the latency and the start of the answer."""
    return (f"{metrics.get('backend')} answered in {metrics.get('latency_s')} s "
            f"({metrics.get('completion_tokens')} tokens): {str(metrics.get('answer', ''))[:60]!r}")
