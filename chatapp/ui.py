"""The Gradio web UI: chat with a backend chosen from a dropdown, rate and correct replies, watch the log grow.

    from chatapp.ui import build_app
    demo = build_app(load_config(), "chat_history.jsonl", "smollm2")
    demo.launch()            # or: python launch.py (see its --help)

Each browser session has its own conversation (a gr.State with its conversation id; the Chatbot's value is
its history); the models are shared by all sessions through ModelSlots. Named API endpoints (/chat, /stats,
/backends) are defined in chatapp/ui_api.py and documented in docs/api.md; the UI's own event handlers are
private. Every error a user can cause reaches the page as one sentence in a warning (gr.Warning), leaving
the conversation and the typed message in place; the API answers with the same sentence as an error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import gradio as gr

from backends import BackendError, GenerationConfig
from chatapp.chat import message_text, new_conversation_id, plain_messages
from chatapp.openai_api import ApiAccess, openai_routes
from chatapp.ui_api import register_api
from chatapp.ui_controls import (
    build_generation_controls,
    context_meter,
    follow_backend_defaults,
    generation_config,
)
from chatapp.ui_conversations import conversation_sidebar
from chatapp.ui_finetune import build_finetune_panel
from chatapp.ui_service import GENERATE, GENERATE_LIMIT, ChatService, ReplyBusy
from gpt.chatlog import ChatLogError

STATUS_POLL_S = 0.5  # how often a loading status line refreshes


class ReplyRefused(Exception):
    """A reply could not be made for a reason the user can fix; the message says what to do."""


def turn_of(history: list[dict], index: int) -> int:
    """The exchange number (0-based) that message `index` of a Chatbot history belongs to."""
    return max(0, sum(1 for m in history[: index + 1] if m.get("role") == "user") - 1)


def _plain(history: list[dict]) -> list[dict]:
    """Chatbot messages (content may be a list of text blocks) as plain {"role", "content": str}."""
    return plain_messages(m for m in history or [] if m.get("role") in ("user", "assistant"))


class ChatBlocks(gr.Blocks):
    """gr.Blocks whose server also answers `extra_routes` (the OpenAI-compatible /v1 of chatapp/openai_api.py).

    Gradio builds a fresh FastAPI app in every `launch`; routes given to its constructor come first, so they
    exist however the app is started (launch.py, tests) and share its port and process.
    """

    extra_routes: list = []

    def launch(self, *args, app_kwargs: dict | None = None, **kwargs):
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["routes"] = [*self.extra_routes, *app_kwargs.get("routes", [])]
        return super().launch(*args, app_kwargs=app_kwargs, **kwargs)


def build_app(config: dict, log_path, default_backend: str | None = None,
              api_access: ApiAccess | None = None) -> gr.Blocks:
    """The app; `api_access` says who may call /v1 (default: keys from $NANOGPT_CHAT_API_KEYS, if any)."""
    service = ChatService(config, log_path, default_backend)
    slots = service.slots
    choices = [(slots.label(k), k) for k in slots.keys()]

    with ChatBlocks(title="nanogpt-chat") as demo:
        conversation = gr.State({})  # {"conversation_id": ...}, one per browser session
        gr.Markdown("## nanogpt-chat")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(height=520, editable="all", show_label=False,
                                     feedback_options=("Like", "Dislike"),
                                     placeholder="Type a message below; replies stream in here. Rate a reply "
                                                 "with 👍 / 👎, or edit it to teach the model a better answer.",
                                     elem_id="chatbot")
                meter = gr.Markdown("Context: nothing sent yet.", elem_id="context-meter")
                with gr.Row():
                    message = gr.Textbox(placeholder="Message (Enter sends)", show_label=False, scale=6,
                                         autofocus=True, submit_btn=False, elem_id="message")
                    send_button = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                    stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                with gr.Row():
                    regenerate_button = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                    clear_button = gr.Button("Clear", size="sm", elem_id="clear")
            with gr.Column(scale=1, min_width=300):
                backend = gr.Dropdown(choices, value=service.default_backend, label="Backend",
                                      elem_id="backend")
                status = gr.Markdown(slots.status(service.default_backend).message, elem_id="status")
                reload_button = gr.Button("Reload native checkpoint", size="sm", elem_id="reload-native")
                stats = gr.Markdown(service.stats_text(), elem_id="stats")
                with gr.Accordion("System prompt", open=False):
                    system_prompt = gr.Textbox(value=service.system_prompt, lines=3, show_label=False,
                                               elem_id="system-prompt")
                with gr.Accordion("Generation settings", open=False):
                    controls = build_generation_controls(service.generation)
                    after_backend_change = follow_backend_defaults(controls, backend, service)

        build_finetune_panel(service)
        settings = [backend, system_prompt, *controls.inputs]

        stop_requests: dict[str, threading.Event] = {}  # session -> set by the Stop button

        def reply(history, state, key, system, cfg, session: str) -> Iterator[tuple]:
            """Stream the assistant's answer to the last user message of `history`.

            A user-caused failure raises ReplyRefused with its sentence; the caller shows it as a warning
            and restores the page (gr.Error would stamp "Error" over every output, the chat included).
            """
            prior, text = history[:-1], message_text(history[-1]["content"])
            state = dict(state or {})
            state.setdefault("conversation_id", new_conversation_id())
            stop = stop_requests.setdefault(session, threading.Event())
            stop.clear()
            try:  # the limits and the key are checked here, before anything loads
                updates = service.stream(key, service.limits.recent(_plain(prior)), text, cfg, system,
                                         state["conversation_id"])
            except (BackendError, ValueError) as exc:
                raise ReplyRefused(str(exc)) from None
            if slots.status(key).state != "ready":
                yield history, state, f"Waiting for {slots.label(key)} to load…", gr.skip()
            shown = [*history, {"role": "assistant", "content": ""}]
            try:
                for update, context_length in updates:
                    shown[-1] = {"role": "assistant", "content": update.text}
                    meter_text = context_meter(update.prompt, context_length, cfg.max_new_tokens, update)
                    if stop.is_set():
                        # Closing logs exactly this text as the (partial) reply, the text the page shows.
                        updates.close()
                        yield shown, state, meter_text + " Stopped.", service.stats_text()
                        return
                    yield shown, state, meter_text, gr.skip()
            except (BackendError, ValueError, ChatLogError) as exc:
                raise ReplyRefused(str(exc)) from None
            yield shown, state, gr.skip(), service.stats_text()

        def settings_config(values) -> GenerationConfig | None:
            try:
                return generation_config(*values)
            except ValueError as exc:
                gr.Warning(f"Check the generation settings: {exc}.")
                return None

        def send(text, history, state, key, system, max_new_tokens, temperature, top_k, top_p,
                 repetition_penalty, stop, seed, request: gr.Request):
            cfg = settings_config((max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed))
            if not (text or "").strip() or cfg is None:
                if cfg is not None:
                    gr.Warning("Type a message first.")
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            session = request.session_hash or ""
            try:
                with service.one_reply(session):
                    before = list(history or [])
                    history = [*before, {"role": "user", "content": text}]
                    yield "", history, state, gr.skip(), gr.skip()
                    try:
                        for out in reply(history, state, key, system, cfg, session):
                            yield "", *out
                    except ReplyRefused as exc:
                        gr.Warning(str(exc))
                        yield text, before, gr.skip(), gr.skip(), gr.skip()  # as it was: fix it and send again
            except ReplyBusy as exc:  # the typed message stays in the box
                gr.Warning(str(exc))
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()

        def regenerate(history, state, key, system, max_new_tokens, temperature, top_k, top_p,
                       repetition_penalty, stop, seed, request: gr.Request):
            cfg = settings_config((max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed))
            history = list(history or [])
            while history and history[-1].get("role") != "user":
                history.pop()
            if not history or cfg is None:
                if cfg is not None:
                    gr.Warning("There is no message to answer again yet.")
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            session = request.session_hash or ""
            try:
                with service.one_reply(session):
                    yield from reply(history, state, key, system, cfg, session)
            except ReplyRefused as exc:
                gr.Warning(str(exc))
            except ReplyBusy as exc:
                gr.Warning(str(exc))
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()

        def request_stop(request: gr.Request):
            stop_requests.setdefault(request.session_hash or "", threading.Event()).set()

        chat_outputs = [chatbot, conversation, meter, stats]
        common = dict(concurrency_limit=GENERATE_LIMIT, concurrency_id=GENERATE, api_visibility="private")
        # One event per action, whatever triggered it: while a reply streams, a second Enter or Send click
        # is ignored (trigger_mode="once") instead of starting a reply to a half-finished history.
        send_event = gr.on([message.submit, send_button.click], send, [message, chatbot, conversation, *settings],
                           [message, *chat_outputs], trigger_mode="once", **common)
        regenerate_event = gr.on([regenerate_button.click, chatbot.retry], regenerate,
                                 [chatbot, conversation, *settings], chat_outputs, trigger_mode="once", **common)
        # Stop is a flag, not a Gradio cancel: a cancel can drop the last piece the chat loop already
        # logged. The reply loop sees the flag at its next piece, closes the stream (the model stops, the
        # partial reply is logged once) and shows exactly the logged text.
        stop_button.click(request_stop, None, None, queue=False, api_visibility="private")

        def clear():
            return [], {"conversation_id": new_conversation_id()}, "Context: nothing sent yet."

        clear_button.click(clear, None, [chatbot, conversation, meter], cancels=[send_event, regenerate_event],
                           api_visibility="private")
        chatbot.clear(clear, None, [chatbot, conversation, meter], api_visibility="private")

        def feedback(history, state, data: gr.LikeData):
            cid = (state or {}).get("conversation_id")
            index = data.index if isinstance(data.index, int) else data.index[0]
            if not cid or index >= len(history) or history[index].get("role") != "assistant":
                return gr.skip()
            rating = {True: "like", False: "dislike", "Like": "like", "Dislike": "dislike"}.get(data.liked)
            try:
                service.log.append_feedback(conversation_id=cid, turn=turn_of(history, index), rating=rating)
            except ChatLogError as exc:
                gr.Warning(str(exc))
                return gr.skip()
            return service.stats_text()

        chatbot.like(feedback, [chatbot, conversation], stats, api_visibility="private")

        def edit(history, state, data: gr.EditData):
            history = list(history)
            index = data.index if isinstance(data.index, int) else data.index[0]
            new_text = message_text(data.value)
            if history[index].get("role") != "assistant":
                gr.Warning("Only the assistant's replies can be edited (to teach it a better answer); send a "
                           "new message to change what you asked.")
                history[index] = {"role": "user", "content": message_text(data.previous_value)}
                return history, gr.skip()
            # The page already shows the edit; sending the history back would reset its 👍 / 👎 marks.
            cid = (state or {}).get("conversation_id")
            if cid:
                try:
                    service.log.append_feedback(conversation_id=cid, turn=turn_of(history, index),
                                                rating=None, edited=new_text)
                except ChatLogError as exc:
                    gr.Warning(f"The edit is shown but was not saved: {exc}")
                    return gr.skip(), gr.skip()
            return gr.skip(), service.stats_text()

        chatbot.edit(edit, [chatbot, conversation], [chatbot, stats], api_visibility="private")

        def watch(key: str, session: str) -> Iterator[str]:
            """The slot's status line, refreshed until it is no longer loading or the session switched away."""
            while not slots.wait(key, STATUS_POLL_S):
                if slots.chosen(session) != key:
                    # Superseded: the newer choice's watcher owns the status line. End on a skip, as an
                    # event's completion re-sends its last value, which would overwrite the newer status.
                    yield gr.skip()
                    return
                yield slots.status(key).message
            yield slots.status(key).message if slots.chosen(session) == key else gr.skip()

        def choose(key, request: gr.Request):
            session = request.session_hash or ""
            try:
                slots.choose(session, key)
            except BackendError as exc:
                gr.Warning(str(exc))
                return
            yield from watch(key, session)

        def reload_native(key, request: gr.Request):
            try:
                slots.reload(key)
            except BackendError as exc:
                gr.Warning(str(exc))
                return
            yield from watch(key, request.session_hash or "")

        # Past conversations: reopening one may pick another backend, which then loads as if chosen here.
        sidebar = conversation_sidebar(service, chatbot, conversation, backend, system_prompt, meter, stats,
                                       cancels=[send_event, regenerate_event])
        for event in (send_event, regenerate_event):
            sidebar.refresh_after(event)
        demo.load(sidebar.refresh_fn, conversation, sidebar.conversations, api_visibility="private",
                  show_progress="hidden")

        status_events = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
        after_backend_change(sidebar.opened.then(choose, backend, status, **status_events))
        backend.input(choose, backend, status, **status_events)
        reload_button.click(reload_native, backend, status, **status_events)
        demo.load(choose, backend, status, **status_events)
        demo.load(service.stats_text, None, stats, api_visibility="private", show_progress="hidden")

        def forget(request: gr.Request):
            slots.forget(request.session_hash or "")
            stop_requests.pop(request.session_hash or "", None)

        demo.unload(forget)
        register_api(service)

    demo.queue(default_concurrency_limit=16)
    demo.chat_service = service  # for launch.py (background preload) and tests
    demo.api_access = api_access or ApiAccess.load()
    demo.extra_routes = openai_routes(service, demo.api_access)
    return demo

