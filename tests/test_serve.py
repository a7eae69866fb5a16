"""The chat demo (course_utils/serve.py): a real Gradio server, a real headless Chromium, a real client.

The end-to-end tests start ``python -m course_utils.serve --model tiny --adapter ...`` in a
subprocess whose HTTP(S) proxy is a local recorder, so any request Gradio (or the page in
Chromium) tried to send off this machine - analytics, a version check, a share tunnel, web
fonts - would be recorded; the tests assert there were none. ``GRADIO_SHARE=True`` is set in
the server's environment on purpose: the CLI must still not open a public link without --share.
"""

import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from course_utils import serve
from course_utils.models import load_model, lora_config

CHROMIUM = "/usr/bin/chromium"
# Flags that let Chromium run headless as root in a container, and keep it from calling home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 12
TEMPERATURE = 0.7  # the CLI default: sampling, with the same seed on both sides
PROMPT = "Continue this movie review: The harbour at dawn"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter on tiny with a random, non-zero B, so the policy and the reference really differ."""
    from peft import get_peft_model

    model, _ = load_model("tiny", seed=0)
    with torch.random.fork_rng(devices=[]):  # A's init draws from the global RNG too: seed it, or the
        torch.manual_seed(1)                 # adapter (and its greedy replies) depend on the tests run before
        peft_model = get_peft_model(model, lora_config(r=8, alpha=16, dropout=0.0))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("serve") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def expected(adapter_dir):
    """The replies the page must show, computed here with plain ``generate`` (no serve.py code)."""
    from peft import PeftModel

    model, tokenizer = load_model("tiny", seed=0)
    policy = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)

    def sample(m):
        torch.manual_seed(0)  # the CLI's default seed, the same for both sides
        with torch.inference_mode():
            out = m.generate(**batch, do_sample=True, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    policy_reply = sample(policy)
    with policy.disable_adapter():
        reference_reply = sample(policy)
    assert _norm(policy_reply) and _norm(reference_reply) and policy_reply != reference_reply
    return {"policy": policy_reply, "reference": reference_reply}


class _Recorder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.requests: list[str] = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(handler):
                line = handler.rfile.readline(2048).decode("latin-1").strip()
                self.requests.append(line)  # e.g. "CONNECT api.gradio.app:443 HTTP/1.1"
                handler.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def proxy():
    """A fake HTTP proxy that records every request sent through it and refuses it."""
    recorder = _Recorder()
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    yield recorder
    recorder.shutdown()
    recorder.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapter_dir, proxy, tmp_path_factory):
    """``python -m course_utils.serve`` in a subprocess, default host, every outside request sent to ``proxy``."""
    port = _free_port()
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GRADIO_") and "PROXY" not in k.upper()}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GRADIO_SHARE="True",  # must not win over the CLI
               HTTP_PROXY=proxy_url, HTTPS_PROXY=proxy_url, ALL_PROXY=proxy_url, http_proxy=proxy_url,
               https_proxy=proxy_url, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "course_utils.serve", "--model", "tiny", "--adapter", str(adapter_dir),
             "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while "Chat page:" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "port": port, "log": log, "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by playwright; missing Chromium is a failure (``make browser`` installs it)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: run `make browser` (apt-get install chromium); the chat test needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # playwright gives every launch a fresh, temporary profile (--user-data-dir)
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _norm(text: str) -> str:
    return " ".join(text.split())


def _listening_hosts(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port``, from /proc/net/tcp{,6} (Linux)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                hosts.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return hosts


# --- end to end ---------------------------------------------------------------------------------------------


def test_browser_chat_shows_policy_and_reference_replies(server, browser, expected, proxy):
    page = browser.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.goto(server["url"])
    page.locator("#prompt textarea").wait_for(timeout=60_000)  # the app renders after its JS loads
    assert "DPO policy vs reference" in page.content()
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#prompt textarea").press("Enter")

    bot = {side: page.locator(f"#{side} [data-testid='bot']") for side in ("policy", "reference")}
    deadline = time.monotonic() + 120
    while True:
        shown = {side: _norm(" ".join(loc.all_inner_texts())) for side, loc in bot.items()}
        if all(shown[s] == _norm(expected[s]) for s in shown):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"page shows {shown}, expected {expected}\nserver log:\n{server['log'].read_text()[-2000:]}")
        time.sleep(0.25)
    assert page.locator("#policy [data-testid='user']").inner_text().strip() == PROMPT
    assert page.locator("#prompt textarea").input_value() == ""  # the box clears for the next message
    assert shown["policy"] != shown["reference"]

    page.locator("#clear").click()  # one conversation ends, both columns empty
    page.wait_for_function("document.querySelectorAll(\"[data-testid='bot']\").length === 0", timeout=30_000)
    page.close()
    assert outside == [], f"the page requested outside resources: {outside}"
    assert proxy.requests == [], f"the server tried to reach the internet: {proxy.requests}"


def test_server_streams_token_by_token(server, expected, proxy):
    """Every partial update the server sends is a prefix of the final reply, and there are many of them."""
    from gradio_client import Client

    client = Client(server["url"], verbose=False, analytics_enabled=False, httpx_kwargs={"trust_env": False})
    job = client.submit(PROMPT, TEMPERATURE, MAX_NEW_TOKENS, 0, api_name="/chat")
    job.result(timeout=120)

    def reply(chat):  # the assistant's text in a Chatbot value, or None before it started
        texts = [part["text"] for m in chat if m["role"] == "assistant" for part in m["content"]]
        return texts[-1].strip() if texts else None  # Gradio strips message text; so do we, on both sides

    updates = {side: [reply(out[i]) for out in job.outputs() if reply(out[i]) is not None]
               for i, side in ((1, "policy"), (2, "reference"))}
    for side, seen in updates.items():
        assert seen[-1] == expected[side].strip()
        assert all(expected[side].strip().startswith(text) for text in seen), seen
        assert len(set(seen)) >= 4, f"{side}: only {len(set(seen))} distinct updates: not streamed"
    assert proxy.requests == []


def test_server_listens_on_loopback_only_and_shares_nothing(server):
    assert _listening_hosts(server["port"]) == {"127.0.0.1"}
    log = server["log"].read_text()
    assert f"Chat page: http://127.0.0.1:{server['port']}/" in log
    assert "gradio.live" not in log and "public link" not in log  # GRADIO_SHARE=True in its env did not count
    try:  # from a non-loopback address of this machine, the port is closed
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.254.254.254", 1))  # UDP connect sends nothing; it only picks the outgoing interface
            own_address = probe.getsockname()[0]
    except OSError:
        own_address = None
    if own_address and not own_address.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((own_address, server["port"]), timeout=5).close()


# --- CLI defaults and errors ----------------------------------------------------------------------------------


def test_cli_defaults_are_private():
    args = serve.build_parser().parse_args(["--model", "tiny"])
    assert args.host == "127.0.0.1" and args.share is False
    assert serve.build_parser().parse_args(["--model", "tiny", "--share"]).share is True


def _files(folder, *names):
    """A folder holding empty files (``{}`` in the json ones)."""
    folder.mkdir()
    for name in names:
        (folder / name).write_text("{}" if name.endswith(".json") else "")


@pytest.mark.parametrize("make, flags, message", [
    (lambda d: None, ["--model", "{d}/nowhere"], "--model {d}/nowhere: no such directory"),
    (lambda d: (d / "empty").mkdir(), ["--model", "{d}/empty"], "--model {d}/empty: no config.json"),
    (lambda d: None, ["--model", "tiny", "--adapter", "{d}/nowhere"], "--adapter {d}/nowhere: no such directory"),
    (lambda d: (d / "run").mkdir() or (d / "run" / "trainer_state.json").write_text("{}"),
     ["--model", "tiny", "--adapter", "{d}/run"], "--adapter {d}/run: no adapter_config.json (found: trainer_state.json)"),
    (lambda d: (d / "ad").mkdir() or (d / "ad" / "adapter_config.json").write_text("{}"),
     ["--model", "tiny", "--adapter", "{d}/ad"], "--adapter {d}/ad: adapter_config.json but no adapter_model"),
    (lambda d: None, ["--model", "tiny"], "--model tiny without --adapter has nothing to compare with"),
    (lambda d: _files(d / "pk", "config.json", "pytorch_model.bin"),  # pickle weights are never loaded
     ["--model", "{d}/pk"], "--model {d}/pk: config.json but no weights (*.safetensors) in the directory (only pickle"),
    (lambda d: _files(d / "pa", "adapter_config.json", "adapter_model.bin"),
     ["--model", "tiny", "--adapter", "{d}/pa"], "--adapter {d}/pa: adapter_config.json but no adapter_model.safetensors"),
])
def test_wrong_paths_name_the_path_and_what_is_missing(tmp_path, make, flags, message):
    make(tmp_path)
    argv = [f.format(d=tmp_path) for f in flags]
    with pytest.raises(serve.ServeError) as err:
        serve.load_chat_models(argv[1], argv[3] if len(argv) > 3 else None)
    assert message.format(d=tmp_path) in str(err.value)


def test_adapter_given_as_model_gets_a_hint(adapter_dir):
    with pytest.raises(serve.ServeError, match="pass it as --adapter"):
        serve.load_chat_models(str(adapter_dir))


def test_adapter_for_another_base_is_a_clear_error(tmp_path, tokenizer):
    """An adapter trained on a different model (hidden size 32, not 64) does not fit tiny."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, lora_config(r=4, alpha=8, dropout=0.0)).save_pretrained(tmp_path / "other")
    with pytest.raises(serve.ServeError, match=r"--adapter .*other does not fit --model tiny"):
        serve.load_chat_models("tiny", tmp_path / "other")


def test_cli_exits_with_the_message(tmp_path):
    """The real command line: exit status 2, the path and what is missing on stderr, no traceback."""
    result = subprocess.run([sys.executable, "-m", "course_utils.serve", "--model", "tiny", "--adapter",
                             str(tmp_path / "missing")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert f"error: --adapter {tmp_path / 'missing'}: no such directory" in result.stderr
    assert "Traceback" not in result.stderr


# --- in-process: the notebook's way, and a merged model ---------------------------------------------------


def test_merged_model_served_in_process_with_base_as_reference(adapter_dir, tmp_path):
    """Lesson 6's path: build_demo + launch in this process; the reference comes from merge_info.json."""
    from gradio_client import Client

    from course_utils.export import merge_adapter

    merge_adapter("tiny", adapter_dir, tmp_path / "merged")
    models = serve.load_chat_models(str(tmp_path / "merged"))
    assert models.reference is not None and "reference: tiny" in models.description
    demo = serve.build_demo(models.policy, models.tokenizer, reference_model=models.reference,
                            max_new_tokens=6, temperature=0.0)
    url = serve.launch(demo, port=_free_port())
    try:
        assert url.startswith("http://127.0.0.1:") and demo.share is False
        client = Client(url, verbose=False, analytics_enabled=False, httpx_kwargs={"trust_env": False})
        _, policy_chat, reference_chat = client.predict("Hello!", 0.0, 6, 0, api_name="/chat")
        policy_text = policy_chat[-1]["content"][0]["text"]
        reference_text = reference_chat[-1]["content"][0]["text"]
        # greedy tiny base only repeats newlines (tied embeddings copy the last token): shown as a note
        assert reference_text == serve.EMPTY_REPLY and policy_text.strip() and policy_text != reference_text
    finally:
        demo.close()


def test_stream_reply_grows_and_reports_errors(tokenizer):
    model, _ = load_model("tiny")
    pieces = list(serve.stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=8,
                                     temperature=1.0, seed=3))
    assert len(pieces) >= 2 and all(pieces[-1].startswith(p) for p in pieces)
    with pytest.raises(AttributeError):  # a plain model has no adapter: the thread's error reaches the caller
        list(serve.stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], disable_adapter=True))


def test_build_demo_needs_a_reference_for_a_model_without_adapter(tokenizer):
    model, _ = load_model("tiny")
    with pytest.raises(ValueError, match="reference_model"):
        serve.build_demo(model, tokenizer)


def test_fit_history_drops_oldest_exchanges(tokenizer):
    turns = [{"role": r, "content": f"{r} turn {i} " + "word " * 40} for i in range(3) for r in ("user", "assistant")]
    turns.append({"role": "user", "content": "last"})
    kept = serve.fit_history(tokenizer, turns, max_tokens=120)
    assert kept[-1]["content"] == "last" and kept[0]["role"] == "user" and len(kept) < len(turns)
    assert serve.fit_history(tokenizer, turns, max_tokens=10_000) == turns


def test_stream_reply_closed_early_stops_generating(tokenizer):
    """A reader that stops after one piece (a closed tab) ends generate at once, instead of 2000 more tokens."""
    model, _ = load_model("tiny")
    stream = serve.stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=2000,
                                temperature=1.0, seed=0)
    next(stream)
    start = time.perf_counter()
    stream.close()  # GeneratorExit inside stream_reply: stop + join
    assert time.perf_counter() - start < 5
    assert not any(t.name == "dpo-chat-generate" and t.is_alive() for t in threading.enumerate())
