"""`edgemoe serve` as a client sees it: a real server process on 127.0.0.1, driven by the official
`openai` client (and raw HTTP where the client would refuse to send the bad request)."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from test_runtime_fixtures import QUESTION, edgemoe_cli, tiny  # noqa: F401 (fixture)

FAMILY = "stablelm"
CTX = 320  # positions: room for the image prompt and answers; a long text overflows it


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: list[str]

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextmanager
def serving(bundle: Path, *args: str) -> Iterator[Server]:
    """`edgemoe -v serve BUNDLE --port 0 ARGS`, until it says where it listens; stopped afterwards."""
    process = subprocess.Popen([sys.executable, "-m", "edgemoe.cli", "-v", "serve", str(bundle), "--port", "0", *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log: list[str] = []
    url = None
    for line in process.stderr:
        log.append(line)
        found = re.search(r"serving \S+ at (http://[\d.]+:\d+)/v1", line)
        if found:
            url = found.group(1)
            break
    assert url, "".join(log)
    reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
    reader.start()
    try:
        yield Server(process, url, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        reader.join(10)


def data_url(path: Path, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_message(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def ask_json(bundle: Path, question: str, image: Path, max_tokens: int) -> dict:
    run = edgemoe_cli("ask", str(bundle), question, "--image", str(image), "--max-tokens", str(max_tokens), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[Server]:
    with serving(tiny.bundle(FAMILY, "int4"), "--ctx-size", str(CTX)) as running:
        yield running
        assert running.stop(signal.SIGTERM) == 0, "".join(running.log)


def test_models_and_health(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == [f"{FAMILY}-int4"]


def test_an_answer_equals_ask_and_streaming_joins_to_it(server: Server, tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    want = ask_json(bundle, QUESTION, tiny.image, 12)
    client = server.client()
    plain = client.chat.completions.create(model=f"{FAMILY}-int4", messages=image_message(QUESTION, data_url(tiny.image)),
                                           max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == want["answer"] and want["answer"]
    assert plain.usage.completion_tokens == len(want["token_ids"])
    assert plain.usage.prompt_tokens == want["stats"]["prompt_tokens"]
    assert plain.choices[0].finish_reason == ("length" if want["stop_reason"] == "length" else "stop")
    stream = client.chat.completions.create(model=f"{FAMILY}-int4", messages=image_message(QUESTION, data_url(tiny.image)),
                                            max_completion_tokens=12, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == want["answer"] and len([p for p in pieces if p]) > 1
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_four_clients_at_once_each_get_their_own_answer(server: Server, tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    questions = ["What is in the image?", "Describe the colours.", "Is there a cat?", "Where was this taken?"]
    want = [ask_json(bundle, q, tiny.image, 8)["answer"] for q in questions]
    got: dict[int, str] = {}

    def one(i: int) -> None:
        reply = server.client().chat.completions.create(
            model=f"{FAMILY}-int4", messages=image_message(questions[i], data_url(tiny.image)), max_tokens=8,
            stream=bool(i % 2))
        got[i] = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if i % 2 else \
            reply.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(4)] == want


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")  # 144 Mpx in a few kB
    return buffer.getvalue()


BAD_REQUESTS = {
    "malformed JSON": (b"{not json", "invalid_json"),
    "no messages": ({"model": f"{FAMILY}-int4", "messages": []}, None),
    "not an image": ({"messages": image_message("What?", "data:image/png;base64,"
                                                + base64.b64encode(b"plain text, not pixels").decode())},
                     "invalid_image"),
    "decompression bomb": ({"messages": image_message("What?", "data:image/png;base64,"
                                                      + base64.b64encode(_bomb_png()).decode())}, "invalid_image"),
    "bad base64": ({"messages": image_message("What?", "data:image/png;base64,@@not base64@@")}, "invalid_image"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": "word " * 2000}]},
                                       "context_length_exceeded"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model_not_found"),
    "remote image without the flag": ({"messages": image_message("What?", "https://example.com/cat.png")},
                                      "remote_images_disabled"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_is_a_400_and_the_next_request_is_answered(server: Server, tiny, case: str) -> None:
    body, code = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"] and (code is None or error["code"] == code)
    after = server.client().chat.completions.create(model=f"{FAMILY}-int4", max_tokens=3,
                                                    messages=image_message(QUESTION, data_url(tiny.image)))
    assert after.choices[0].message.content == ask_json(tiny.bundle(FAMILY, "int4"), QUESTION, tiny.image, 3)["answer"]


def test_the_openai_client_sees_typed_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=f"{FAMILY}-int4", input="hi")


@contextmanager
def files_over_http(root: Path) -> Iterator[str]:
    """A local static file server (the stand-in for a remote image host)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join(10)


def test_remote_images_are_fetched_only_when_allowed(tiny, tmp_path) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    (tmp_path / "image.png").write_bytes(tiny.image.read_bytes())
    (tmp_path / "note.txt").write_text("not an image")
    want = ask_json(bundle, QUESTION, tiny.image, 5)["answer"]
    with files_over_http(tmp_path) as host, serving(bundle, "--allow-remote-images") as server:
        client = server.client()
        reply = client.chat.completions.create(model=bundle.name, max_tokens=5,
                                               messages=image_message(QUESTION, f"{host}/image.png"))
        assert reply.choices[0].message.content == want
        for path, code in (("note.txt", "invalid_image"), ("missing.png", "image_fetch_failed")):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=bundle.name, max_tokens=5,
                                               messages=image_message(QUESTION, f"{host}/{path}"))
            assert caught.value.body["code"] == code
        assert server.stop() == 0


def test_api_key_queue_limit_cancellation_and_a_clean_stop(tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    with serving(bundle, "--api-key", "sesame", "--max-queue", "0") as server:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
        client = server.client("sesame")
        # A long streamed answer: read two chunks, then walk away while it is still generating.
        long_request = client.chat.completions.create(
            model=f"{FAMILY}-int4", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=3500,
            stream=True)
        chunks = iter(long_request)
        next(chunks), next(chunks)
        # While it runs, nothing may wait (--max-queue 0): a second request is turned away.
        busy = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer sesame"},
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
        assert busy.status_code == 503 and busy.headers["Retry-After"] and busy.json()["error"]["code"] == "queue_full"
        long_request.close()
        # The queue moves on: the abandoned answer stops at its next token, the next request is served.
        for _ in range(200):
            reply = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer sesame"},
                               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
            if reply.status_code != 503:
                break
            time.sleep(0.05)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        assert server.stop(signal.SIGINT) == 0
    log = "".join(server.log)
    cancelled = re.search(r"request stopped after (\d+) tokens: cancelled", log)
    assert cancelled and int(cancelled.group(1)) < 3500, log
    assert "stopped" in log.splitlines()[-1] and "Traceback" not in log


def test_stop_strings_seeds_and_multi_turn_histories(server: Server, tiny) -> None:
    client = server.client()
    messages = image_message(QUESTION, data_url(tiny.image))
    full = client.chat.completions.create(model=f"{FAMILY}-int4", messages=messages, max_tokens=12).choices[0]
    cut_at = full.message.content[len(full.message.content) // 2:][:2]
    stopped = client.chat.completions.create(model=f"{FAMILY}-int4", messages=messages, max_tokens=12, stop=[cut_at])
    assert stopped.choices[0].message.content == full.message.content[:full.message.content.index(cut_at)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=f"{FAMILY}-int4", messages=messages, max_tokens=8, temperature=1.2,
                                              seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    # A second turn: the history in the family's template, as `chat` builds it (the same prompt, token for token).
    history = messages + [{"role": "assistant", "content": full.message.content},
                          {"role": "user", "content": "And the colour?"}]
    second = client.chat.completions.create(model=f"{FAMILY}-int4", messages=history, max_tokens=6)
    chat = edgemoe_cli("chat", str(tiny.bundle(FAMILY, "int4")), "--image", str(tiny.image), "--max-tokens", "12",
                       "--json", stdin=f"{QUESTION}\nAnd the colour?\n")
    turns = [json.loads(line) for line in chat.stdout.splitlines()]
    assert turns[0]["answer"] == full.message.content
    assert second.usage.prompt_tokens == turns[1]["stats"]["prompt_tokens"] > turns[0]["stats"]["prompt_tokens"]


def test_deepseek_takes_two_images_in_one_message_as_ask_does(tiny, tmp_path) -> None:
    second = tmp_path / "second.png"
    Image.new("RGB", (90, 40), (30, 160, 60)).save(second)
    bundle = tiny.bundle("deepseek-vl2-tiny", "int4")
    run = edgemoe_cli("ask", str(bundle), QUESTION, "--image", str(tiny.image), "--image", str(second),
                      "--max-tokens", "6", "--json")
    want = json.loads(run.stdout)
    with serving(bundle) as server:
        content = [{"type": "image_url", "image_url": {"url": data_url(tiny.image)}},
                   {"type": "image_url", "image_url": {"url": data_url(second)}},
                   {"type": "text", "text": QUESTION}]
        reply = server.client().chat.completions.create(model=bundle.name, max_tokens=6,
                                                        messages=[{"role": "user", "content": content}])
        assert server.stop() == 0
    assert reply.choices[0].message.content == want["answer"]
    assert reply.usage.prompt_tokens == want["stats"]["prompt_tokens"] and want["stats"]["image_tokens"] > 0
