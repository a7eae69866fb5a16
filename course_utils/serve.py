"""A local chat page for a DPO model: the policy's reply next to the reference's, streamed.

From a shell (the same code lesson 6 runs in its notebook)::

    python -m course_utils.serve --model tiny --adapter build/dpo/adapter
    python -m course_utils.serve --model smollm2-135m --adapter build/course/dpo/adapter
    python -m course_utils.serve --model build/course/merged      # merged: reference from merge_info.json

The page (Gradio) shows two conversations side by side. The *reference* is the model DPO
started from, the pi_ref of the DPO loss: the same ``PeftModel`` with its LoRA adapter
switched off (no second copy in memory), or, for a merged checkpoint, a separate base model.
Both sides sample with the same seed, so a difference between them comes from the weights,
not from the dice.

Private and offline by default: it listens on 127.0.0.1 only, makes a public
``*.gradio.live`` link only with ``--share``, and turns Gradio's analytics and version
check off before Gradio is imported, so launching sends nothing off this machine. Replies
are shown as plain text (no Markdown or HTML rendering of model output).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .generation import chat_prompt
from .models import MODEL_NAMES, SMOLLM2_HUB_ID

# Must be set before gradio is imported: it starts a version check at import/Blocks time otherwise.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

DEFAULT_HOST = "127.0.0.1"  # loopback: nobody else on the network can reach the model
DEFAULT_PORT = 7860  # Gradio's usual port
MAX_PROMPT_CHARS = 4_000  # a chat message, not a document
SIDES = ("policy", "reference")
EMPTY_REPLY = "(no visible text: the model only produced whitespace or ended its turn at once)"


class ServeError(ValueError):
    """A --model / --adapter / --reference argument is wrong; the message names the path and what is missing."""


# --- checking and loading the models ------------------------------------------------------------------------


def check_model_path(name: str, flag: str = "--model") -> str:
    """``name`` if it is a course model name or a local transformers model directory, else a :class:`ServeError`."""
    if name in MODEL_NAMES:
        return name
    path = Path(name)
    if not path.exists():
        raise ServeError(f"{flag} {name}: no such directory (expected one of {', '.join(MODEL_NAMES)}, "
                         "or a local model directory with config.json)")
    if not path.is_dir():
        raise ServeError(f"{flag} {name}: is a file, not a model directory")
    if not (path / "config.json").is_file():
        hint = (f"; it holds a LoRA adapter (adapter_config.json): pass it as --adapter {name} with "
                "--model <its base>") if (path / "adapter_config.json").is_file() else ""
        raise ServeError(f"{flag} {name}: no config.json, so not a transformers model directory{hint}")
    if not any(path.glob("*.safetensors")):
        pickled = " (only pickle .bin weights, which the course never loads)" if any(path.glob("*.bin")) else ""
        raise ServeError(f"{flag} {name}: config.json but no weights (*.safetensors) in the directory{pickled}")
    return name


def check_adapter_dir(adapter) -> Path:
    """The adapter directory, or a :class:`ServeError` naming the missing piece."""
    path = Path(adapter)
    if not path.is_dir():
        raise ServeError(f"--adapter {adapter}: no such directory")
    if not (path / "adapter_config.json").is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        hint = "; lesson 4 and the training CLI save it in <output-dir>/adapter" if (path / "adapter").is_dir() else ""
        raise ServeError(f"--adapter {adapter}: no adapter_config.json (found: {found}){hint}")
    if not (path / "adapter_model.safetensors").is_file():  # a pickled adapter_model.bin is never loaded
        raise ServeError(f"--adapter {adapter}: adapter_config.json but no adapter_model.safetensors")
    return path


def _training_preset(adapter_dir: Path) -> dict:
    """Lesson 4 saves ``preset.json`` next to ``adapter/``: the base's dtype, 4-bit flag, checkpoint and seed."""
    path = adapter_dir.parent / "preset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _merged_base(model_dir: str) -> str | None:
    """The base a merged checkpoint came from (``merge_info.json`` written by ``export.merge_adapter``)."""
    path = Path(model_dir) / "merge_info.json"
    if not path.is_file():
        return None
    base = json.loads(path.read_text()).get("base")
    return "smollm2-135m" if base == SMOLLM2_HUB_ID else base  # the offline-capable name for SmolLM2


@dataclass
class ChatModels:
    """What the page serves: the policy, its tokenizer, and the reference (None: the policy's adapter off)."""

    policy: object
    tokenizer: object
    reference: object | None
    description: str  # one line for the page and the console


def load_chat_models(model: str, adapter=None, reference: str | None = None, *, dtype: str | None = None,
                     load_in_4bit: bool | None = None) -> ChatModels:
    """Load the policy (``model`` + ``adapter``) and decide what the reference is.

    With an adapter the reference is the same ``PeftModel`` with the adapter disabled. Without
    one (a merged checkpoint) the reference is ``reference``, or the base named in the
    checkpoint's ``merge_info.json``. The base is loaded as training saw it: dtype and 4-bit from
    lesson 4's ``preset.json`` beside the adapter when present (``export.load_base``).
    """
    from .export import load_base

    check_model_path(model)
    adapter_dir = check_adapter_dir(adapter) if adapter else None
    if reference is not None:
        check_model_path(reference, "--reference")
    if adapter_dir is None and reference is None:
        reference = _merged_base(model)
        if reference is None:
            raise ServeError(f"--model {model} without --adapter has nothing to compare with: pass --adapter "
                             "<LoRA dir>, or --reference <base model> for a merged model")
        check_model_path(reference, f"--reference (from {model}/merge_info.json)")

    fields = _training_preset(adapter_dir) if adapter_dir else {}
    if dtype:
        fields["dtype"] = dtype
    base, tokenizer = load_base(model, preset=fields, load_in_4bit=load_in_4bit)
    if adapter_dir is None:
        ref_model = load_base(reference, preset=fields, load_in_4bit=load_in_4bit)[0].eval()
        return ChatModels(base.eval(), tokenizer, ref_model, f"policy: {model}; reference: {reference}")

    from peft import PeftModel

    try:
        policy = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. size mismatch: trained on another base
        raise ServeError(f"--adapter {adapter} does not fit --model {model}: {str(err).splitlines()[0]}") from err
    if (adapter_dir / "tokenizer_config.json").is_file():  # the tokenizer (chat template) training used
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    description = f"policy: {model} + adapter {adapter_dir.name}; reference: the same model, adapter off"
    return ChatModels(policy, tokenizer, None, description)


# --- generation ---------------------------------------------------------------------------------------------


def stream_reply(model, tokenizer, messages: list[dict], *, disable_adapter: bool = False, max_new_tokens: int = 128,
                 temperature: float = 0.7, seed: int | None = 0) -> Iterator[str]:
    """Yield the reply to ``messages`` as it grows (the whole text so far, not the new piece).

    ``generate`` runs in a thread and hands decoded text to a ``TextIteratorStreamer``;
    ``temperature`` 0 is greedy. The adapter switch and the seed are applied inside that
    thread, around exactly one ``generate`` call. Closing the iterator early (a browser tab
    closed mid-reply) stops ``generate`` and waits for it, so the caller's lock is never
    released while the adapter is still switched off.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    text = chat_prompt(tokenizer, messages)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run():
        try:
            switch = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
            with torch.inference_mode(), switch:
                if seed is not None:
                    torch.manual_seed(seed)  # same seed on both sides: differences come from the weights
                model.generate(**batch, streamer=streamer, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id,
                               stopping_criteria=StoppingCriteriaList([StopWhenAsked()]), **sampling)
        except BaseException as err:  # surface it in the caller instead of hanging the streamer
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, name="dpo-chat-generate", daemon=True)
    thread.start()
    reply = ""
    try:
        for piece in streamer:
            reply += piece
            yield reply
    finally:  # also when the consumer stops early: end generate before returning
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    yield reply


def fit_history(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
    """Drop the oldest exchanges until the rendered prompt has at most ``max_tokens`` tokens."""
    def length(msgs):
        return len(tokenizer(chat_prompt(tokenizer, msgs), add_special_tokens=False)["input_ids"])

    while len(messages) > 1 and length(messages) > max_tokens:
        messages = messages[2:]  # one user turn and the reply to it
    return messages


def shown(reply: str) -> str:
    """What the page shows for a reply: the text, or a note when there is no visible text."""
    return reply if reply.strip() else EMPTY_REPLY


# --- the page -----------------------------------------------------------------------------------------------


def build_demo(policy, tokenizer, *, reference_model=None, max_new_tokens: int = 128, temperature: float = 0.7,
               seed: int = 0, description: str = ""):
    """The Gradio ``Blocks`` app; :func:`launch` serves it.

    Args:
        policy: the DPO model. A ``PeftModel`` doubles as the reference (adapter disabled).
        reference_model: the base model, needed when ``policy`` has no adapter (a merged model).
    """
    import gradio as gr

    if reference_model is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("policy has no LoRA adapter to switch off; pass reference_model= (the base model).")
    limit = min(getattr(policy.config, "max_position_embeddings", 2048), 8192)
    lock = threading.Lock()  # one generation at a time: the adapter switch is model-wide state

    def respond(message, policy_history, reference_history, temperature, max_new_tokens, seed):
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        if len(message) > MAX_PROMPT_CHARS:
            raise gr.Error(f"Messages are limited to {MAX_PROMPT_CHARS} characters.")
        settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=int(seed))
        sides = {"policy": list(policy_history) + [{"role": "user", "content": message}],
                 "reference": list(reference_history) + [{"role": "user", "content": message}]}
        replies, running, done = {"policy": "", "reference": ""}, None, set()

        def view():
            """Both chat boxes: each history, plus its reply so far (or in full, once done)."""
            boxes = []
            for side in SIDES:
                reply = [{"role": "assistant", "content": shown(replies[side]) if side in done else replies[side]}]
                boxes.append(sides[side] + (reply if side in done or side == running else []))
            return boxes

        yield "", *view(), policy_history, reference_history  # the message shows at once, even while queued
        with lock:
            for running in SIDES:  # one after the other: a PeftModel is the policy *and* the reference
                model = reference_model if running == "reference" and reference_model is not None else policy
                off = running == "reference" and reference_model is None  # the reference: adapter disabled
                history = fit_history(tokenizer, sides[running], limit - settings["max_new_tokens"])
                for replies[running] in stream_reply(model, tokenizer, history, disable_adapter=off, **settings):
                    yield "", *view(), policy_history, reference_history
                done.add(running)
        raw = [sides[s] + [{"role": "assistant", "content": replies[s]}] for s in SIDES]
        yield "", *view(), *raw

    with gr.Blocks(title="DPO chat: policy vs reference", analytics_enabled=False) as demo:
        gr.Markdown("## DPO policy vs reference\n" + (description or "") +
                    "\n\nBoth sides sample with the same seed; temperature 0 is greedy.")
        with gr.Row():
            # plain text: model output is never rendered as Markdown/HTML; no "share" button (uploads to the Hub)
            boxes = dict(render_markdown=False, height=420, feedback_options=None, buttons=["copy", "copy_all"])
            policy_box = gr.Chatbot(label="DPO policy", elem_id="policy", **boxes)
            reference_box = gr.Chatbot(label="Reference (before DPO)", elem_id="reference", **boxes)
        prompt = gr.Textbox(label="Message (Enter sends)", elem_id="prompt", lines=1, max_lines=8, autofocus=True,
                            placeholder="Continue this movie review: The harbour at dawn ...")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Sampling", open=False):
            temperature_in = gr.Slider(0.0, 1.5, value=temperature, step=0.05, label="Temperature (0: greedy)")
            max_new_in = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Max new tokens")
            seed_in = gr.Number(value=seed, precision=0, label="Seed (the same for both sides)")
        policy_state, reference_state = gr.State([]), gr.State([])  # the raw conversations the models see

        inputs = [prompt, policy_state, reference_state, temperature_in, max_new_in, seed_in]
        outputs = [prompt, policy_box, reference_box, policy_state, reference_state]
        send.click(respond, inputs, outputs, api_name="chat")
        prompt.submit(respond, inputs, outputs, api_visibility="private")
        everything = [policy_box, reference_box, policy_state, reference_state]
        for event in (clear.click, policy_box.clear, reference_box.clear):  # clearing one side clears both
            event(lambda: ([], [], [], []), None, everything, api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo, host: str = DEFAULT_HOST, port: int | None = None, *, share: bool = False, block: bool = False) -> str:
    """Serve ``demo``; returns its local URL. ``block=False`` returns at once (notebooks), ``demo.close()`` stops it.

    ``share`` is passed explicitly: left as None, Gradio turns a public link *on* by itself on
    Colab and whenever ``GRADIO_SHARE`` is set. On Colab without a share link, Gradio shows the
    page through Colab's own proxy instead.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: serving on {host}: anyone who can reach this machine can use the model.")
    if share:
        print("Warning: --share makes a public *.gradio.live link through Gradio's servers: anyone with it can chat.")
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, inbrowser=False,
                show_error=True, quiet=True)
    print(f"Chat page: {demo.local_url}  (listening on {host}{'; public link: ' + demo.share_url if share else ''})",
          flush=True)
    if block:
        demo.block_thread()  # until Ctrl+C
    return demo.local_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with a DPO model next to its reference (a local Gradio page).")
    parser.add_argument("--model", required=True, help=f"{', '.join(MODEL_NAMES)}, or a local model directory "
                        "(e.g. a merged checkpoint)")
    parser.add_argument("--adapter", help="LoRA adapter directory (adapter_config.json); reference = adapter off")
    parser.add_argument("--reference", help="reference model for a merged --model (default: merge_info.json's base)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, shared by policy and reference")
    parser.add_argument("--dtype", help="float32, float16, bfloat16 (default: lesson 4's preset.json, else float32)")
    parser.add_argument("--load-in-4bit", action="store_true", default=None, help="load the base in NF4 (QLoRA)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        models = load_chat_models(args.model, args.adapter, args.reference, dtype=args.dtype,
                                  load_in_4bit=args.load_in_4bit)
    except ServeError as err:
        parser.exit(2, f"error: {err}\n")
    print(models.description, flush=True)
    demo = build_demo(models.policy, models.tokenizer, reference_model=models.reference, description=models.description,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    launch(demo, args.host, args.port, share=args.share, block=True)


if __name__ == "__main__":
    main(sys.argv[1:])
