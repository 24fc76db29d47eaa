"""The chat app: token budgeting (budget.py), the chat log (history.py), the chat loop (chat.py), the console
chat (`python -m chatapp.cli`) and the Gradio UI (ui.py, started by launch.py).

Submodules are imported where they are used, so the console chat never loads Gradio.
"""
