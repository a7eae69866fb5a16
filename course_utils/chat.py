"""A minimal local chat page: the DPO policy's reply next to the reference model's.

Standard library only (``http.server`` + a thread), so it runs anywhere the notebook runs::

    server = start_chat_server(peft_model, tokenizer)  # binds 127.0.0.1, a free port
    print(server.url)                                  # open it in a browser
    server.stop()

``GET /`` serves one HTML page with a text box; the page calls ``POST /chat`` with
``{"prompt": "..."}`` and shows ``{"policy": "...", "reference": "..."}``. The reference is
the same ``PeftModel`` with its LoRA adapter switched off (no second copy in memory), or,
for a merged model, a separate base model passed as ``reference_model``.

Safety: the server listens on the loopback interface only, unless a caller asks for
another ``host``. It only accepts JSON POSTs (a browser must ask first, in a CORS
preflight this server never approves, before another website may send one), caps the
request size, and answers one generation at a time.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .generation import chat_prompt

MAX_BODY_BYTES = 16_384  # a prompt, not a document
MAX_PROMPT_CHARS = 4_000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DPO chat: policy vs reference</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
 textarea{width:100%;height:5rem;font:inherit} .row{display:flex;gap:1rem;margin-top:1rem}
 .col{flex:1;border:1px solid #ccc;border-radius:6px;padding:.75rem;white-space:pre-wrap;min-height:4rem}
 h2{font-size:1rem;margin:0 0 .5rem} button{margin-top:.5rem;font:inherit}
</style></head><body>
<h1>DPO policy vs reference</h1>
<p>Both replies use greedy decoding and the chat template. The reference is the same model with the LoRA adapter off.</p>
<textarea id="prompt">Continue this movie review with one or two sentences.

The film opens with a long, quiet shot of the harbour</textarea>
<button id="send">Send</button> <span id="status"></span>
<div class="row"><div class="col"><h2>DPO policy</h2><div id="policy"></div></div>
<div class="col"><h2>Reference</h2><div id="reference"></div></div></div>
<script>
document.getElementById("send").onclick = async () => {
  const status = document.getElementById("status");
  status.textContent = "generating...";
  try {
    const r = await fetch("chat", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({prompt: document.getElementById("prompt").value})});
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.status);
    document.getElementById("policy").textContent = data.policy;      // textContent: never HTML
    document.getElementById("reference").textContent = data.reference;
    status.textContent = "";
  } catch (e) { status.textContent = "error: " + e.message; }
};
</script></body></html>
"""


@torch.inference_mode()
def reply(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, disable_adapter: bool = False) -> str:
    """Greedy reply of ``model`` to one user message (rendered with the chat template)."""
    text = chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    context = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with context:
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_replies(model, tokenizer, prompt: str, *, reference_model=None, max_new_tokens: int = 64) -> dict:
    """``{"policy": ..., "reference": ...}`` for one prompt; see :func:`start_chat_server` for the reference."""
    policy = reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
    if reference_model is not None:
        reference = reply(reference_model, tokenizer, prompt, max_new_tokens=max_new_tokens)
    else:
        reference = reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens, disable_adapter=True)
    return {"policy": policy, "reference": reference}


@dataclass
class ChatServer:
    """A running chat server; ``stop()`` shuts it down (also usable as a context manager)."""

    host: str
    port: int
    _server: ThreadingHTTPServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the thread; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _handler(model, tokenizer, reference_model, max_new_tokens, lock):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the notebook's output clean
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self):
            if self.path.split("?")[0] in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/chat":
                return self._json(404, {"error": "not found"})
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return self._json(415, {"error": "send application/json"})
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY_BYTES:
                return self._json(413, {"error": f"body must be 1..{MAX_BODY_BYTES} bytes"})
            try:
                prompt = json.loads(self.rfile.read(length))["prompt"]
                if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return self._json(400, {"error": f'expected {{"prompt": "<1..{MAX_PROMPT_CHARS} characters>"}}'})
            with lock:  # one generation at a time: the adapter switch is model-wide state
                answers = chat_replies(model, tokenizer, prompt, reference_model=reference_model,
                                       max_new_tokens=max_new_tokens)
            self._json(200, answers)

    return Handler


def start_chat_server(model, tokenizer, port: int = 0, host: str = "127.0.0.1", *, reference_model=None,
                      max_new_tokens: int = 64) -> ChatServer:
    """Serve the chat page in a background thread; returns a :class:`ChatServer` (``.url``, ``.stop()``).

    Args:
        model: the DPO policy. A ``PeftModel`` doubles as the reference (adapter disabled).
        port: 0 picks a free port.
        host: the interface to listen on. The loopback default keeps the model private to this
            machine; "0.0.0.0" would expose it to the network and is never chosen for you.
        reference_model: the base model, needed when ``model`` has no adapter to switch off (a merged model).
    """
    if reference_model is None and not hasattr(model, "disable_adapter"):
        raise ValueError("model has no LoRA adapter to switch off; pass reference_model= (the base model).")
    if host not in ("127.0.0.1", "localhost"):
        print(f"Warning: serving on {host}: anyone who can reach this machine can use the model.")
    handler = _handler(model, tokenizer, reference_model, max_new_tokens, threading.Lock())
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="dpo-chat-server", daemon=True)
    thread.start()
    return ChatServer(host=host, port=server.server_address[1], _server=server, _thread=thread)


def colab_url(port: int) -> str | None:
    """On Colab, a browser URL for ``port`` proxied through Colab's frontend; None elsewhere."""
    try:
        from google.colab.output import eval_js
    except ImportError:
        return None
    return eval_js(f"google.colab.kernel.proxyPort({port})")
