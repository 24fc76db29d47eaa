"""The past-conversations sidebar of the web UI: reopen, start new, rename, hide, export and import.

    with gr.Blocks() as demo:
        ...                                          # the chat column (chatbot, conversation state, backend)
        sidebar = conversation_sidebar(service, chatbot, conversation, backend, system_prompt, meter, stats,
                                       cancels=[send_event])
        sidebar.refresh_after(send_event)            # a new conversation appears once its first reply is logged

The list is the chat log's conversations, newest first, titled by their first message (or a name given
with Rename); it is the same for every browser session, as the log is. Reopening one shows its turns (with
edits applied), selects its backend and system prompt, and continues it under the same conversation id, so
the next exchange is logged as its next turn. The logic (and the log notes for hide and rename) lives in
chatapp/conversations.py.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from chatapp.chat import new_conversation_id
from chatapp.conversations import ImportFileError
from gpt.chatlog import ChatLogError

EMPTY_METER = "Context: nothing sent yet."


@dataclass
class ConversationSidebar:
    conversations: gr.Radio
    refresh_fn: object  # (conversation state) -> an update of the list
    state: gr.State
    opened: object  # the reopen event: chain what must follow a change of backend

    def refresh_after(self, event) -> None:
        """Refresh the list (the current conversation selected) once `event` ends."""
        event.then(self.refresh_fn, self.state, self.conversations, api_visibility="private",
                   show_progress="hidden")


def _when(timestamp: str) -> str:
    return timestamp[:16].replace("T", " ") if timestamp else ""


def conversation_sidebar(service, chatbot, conversation, backend, system_prompt, meter, stats,
                         cancels=()) -> ConversationSidebar:
    index = service.conversations
    exports = Path(tempfile.mkdtemp(prefix="nanogpt-chat-export-"))
    quiet = dict(api_visibility="private", show_progress="hidden")

    def choices():
        return [(f"{s.title} · {_when(s.updated)}" if s.updated else s.title, s.conversation_id)
                for s in index.summaries()]

    def refresh(state):
        try:
            listed = choices()
        except ChatLogError as exc:
            gr.Warning(str(exc))
            return gr.skip()
        current = (state or {}).get("conversation_id")
        return gr.update(choices=listed, value=current if current in {v for _, v in listed} else None)

    with gr.Sidebar(label="Conversations", open=True, elem_id="conversation-sidebar"):
        new_chat = gr.Button("New chat", variant="primary", size="sm", elem_id="new-chat")
        listing = gr.Radio([], value=None, label="Past conversations", info="newest first; click one to reopen it",
                           elem_id="conversations")
        with gr.Accordion("Rename or hide this chat", open=False):
            title = gr.Textbox(show_label=False, placeholder="New name for this chat", elem_id="rename-title")
            with gr.Row():
                rename = gr.Button("Rename", size="sm", elem_id="rename")
                hide = gr.Button("Hide from list", size="sm", elem_id="hide")
            gr.Markdown("Hiding keeps the chat in the log (fine-tuning still reads it); only this list stops "
                        "showing it.", elem_classes="hint")
        with gr.Accordion("Export / import", open=False):
            fmt = gr.Radio(["JSON", "Markdown"], value="JSON", show_label=False, elem_id="export-format")
            with gr.Row():
                export_one = gr.Button("Export this chat", size="sm", elem_id="export-current")
                export_all = gr.Button("Export all", size="sm", elem_id="export-all")
            exported = gr.File(label="Download", interactive=False, elem_id="export-file")
            upload = gr.UploadButton("Import a JSON export", file_types=[".json"], size="sm", elem_id="import")

    def reopen(cid):
        conv = index.get(cid) if cid else None
        if conv is None:
            gr.Warning("That conversation is no longer in the chat log; pick another one.")
            return (gr.skip(),) * 5
        messages = [m for m in conv.messages() if m["role"] != "system"]
        newest = conv.exchanges[-1].backend
        key = newest if newest in service.slots.keys() else gr.skip()
        meter_text = f"Reopened: {len(conv.exchanges)} earlier turn{'s' if len(conv.exchanges) != 1 else ''}; " \
                     "your next message continues this conversation."
        return messages, {"conversation_id": cid}, key, conv.system_prompt or "", meter_text

    opened = listing.input(reopen, listing, [chatbot, conversation, backend, system_prompt, meter],
                           cancels=list(cancels), **quiet)

    def start_new():
        return [], {"conversation_id": new_conversation_id()}, EMPTY_METER, gr.update(value=None)

    new_chat.click(start_new, None, [chatbot, conversation, meter, listing], cancels=list(cancels), **quiet)

    def note(action, state, text=""):
        cid = (state or {}).get("conversation_id")
        if not cid or index.get(cid) is None:
            gr.Warning("This chat is not in the log yet: send a message first.")
            return gr.skip(), gr.skip()
        try:
            if action == "rename":
                if not text.strip():
                    gr.Warning("Type the new name first.")
                    return gr.skip(), gr.skip()
                index.rename(cid, text)
            else:
                index.hide(cid)
        except ChatLogError as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.skip()
        return refresh(state), ""

    rename.click(lambda state, text: note("rename", state, text), [conversation, title], [listing, title], **quiet)
    title.submit(lambda state, text: note("rename", state, text), [conversation, title], [listing, title], **quiet)
    hide.click(lambda state: note("hide", state), conversation, [listing, title], **quiet)

    def export(which, state, kind):
        ids = None
        if which == "current":
            cid = (state or {}).get("conversation_id")
            if not cid or index.get(cid) is None:
                gr.Warning("This chat is not in the log yet: send a message first, or use Export all.")
                return gr.skip()
            ids = [cid]
        try:
            if kind == "Markdown":
                body, suffix = index.markdown(ids), "md"
            else:
                import json

                body, suffix = json.dumps(index.export(ids), ensure_ascii=False, indent=1), "json"
        except ChatLogError as exc:
            gr.Warning(str(exc))
            return gr.skip()
        path = exports / f"nanogpt-chat-{'conversation' if ids else 'all'}-{new_conversation_id()[:8]}.{suffix}"
        path.write_text(body, encoding="utf-8")
        return str(path)

    export_one.click(lambda state, kind: export("current", state, kind), [conversation, fmt], exported, **quiet)
    export_all.click(lambda state, kind: export("all", state, kind), [conversation, fmt], exported, **quiet)

    def import_file(file, state):
        try:
            text = Path(file if isinstance(file, str) else file.name).read_text(encoding="utf-8", errors="replace")
            result = index.import_text(text)
        except (ImportFileError, ChatLogError) as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.skip()
        except OSError as exc:
            gr.Warning(f"Cannot read that file ({exc.strerror or exc}): pick the exported .json file again.")
            return gr.skip(), gr.skip()
        gr.Info(f"Imported {result.added} exchange{'s' if result.added != 1 else ''} "
                f"({result.skipped} already in the log) from {result.conversations} "
                f"conversation{'s' if result.conversations != 1 else ''}.")
        return refresh(state), service.stats_text()

    upload.upload(import_file, [upload, conversation], [listing, stats], **quiet)

    return ConversationSidebar(listing, refresh, conversation, opened)
