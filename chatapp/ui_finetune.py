"""The web UI's fine-tune panel and its API: teach the native model from the chat log, without leaving the app.

    from chatapp.ui_finetune import build_finetune_panel
    with gr.Blocks():
        ...
        build_finetune_panel(service)     # the panel, plus /finetune, /finetune_status, /finetune_cancel

The panel shows what the log holds and what a run would learn under the chosen filters, starts one run at a
time (chatapp/finetune_job.py runs `python -m training.finetune` in a child process), shows its progress
bar and loss curve while it runs (the chat stays usable), offers Cancel, and shows the before/after report.
On success the native backend serves the new checkpoint at once; "Use the base" switches back.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from chatapp.finetune_job import FinetuneJob, FinetuneRefused

POLL_S = 1.0  # how often an open page refreshes the run's progress


def native_key(slots) -> str | None:
    return next((k for k in slots.keys() if slots.kind(k) == "native"), None)


def progress_html(s: dict) -> str:
    total, step = s.get("total") or 0, s.get("step") or 0
    losses = []
    if s.get("train_loss") is not None:
        losses.append(f"train loss {s['train_loss']:.3f}")
    if s.get("val_loss") is not None:
        losses.append(f"val loss {s['val_loss']:.3f}")
    bar = f'<progress id="finetune-progress" value="{step}" max="{max(total, 1)}" style="width:100%"></progress>'
    counts = f"step {step} of {total}" if total else ""
    detail = ", ".join(x for x in (counts, *losses) if x)
    return f"{bar}<div><b>{s['state']}</b>{': ' + detail if detail else ''}. {s.get('message') or ''}</div>"


def loss_frame(s: dict) -> pd.DataFrame:
    rows = [{"step": i + 1, "loss": v, "series": "train (step)"} for i, v in enumerate(s.get("losses") or [])]
    rows += [{"step": e["iter"], "loss": e["val_loss"], "series": "val"} for e in s.get("evals") or []]
    frame = pd.DataFrame(rows, columns=["step", "loss", "series"])
    # Numbers, not objects: an object column makes the plot treat each loss as a category.
    return frame.astype({"step": int, "loss": float, "series": str})


def report_markdown(s: dict) -> str:
    r = s.get("report")
    if not r:
        return ""
    rec, ret = r["recall"], r["retention"]
    lines = [f"**Before → after.** Val loss {r['val_loss_before']:.3f} → {r['val_loss_after']:.3f}. ",
             f"Asked back, the model now gives {rec['edited']['reproduced']} of {rec['edited']['total']} edited "
             f"replies and {rec['liked']['reproduced']} of {rec['liked']['total']} liked replies word for word. ",
             f"General questions: {ret['right_before']} of {ret['questions']} right before, {ret['right_after']} "
             f"after ({ret['kept']} kept)."]
    lines += [f"\n- lost: *{x['question']}* → “{x['after']}”" for x in ret["lost"]]
    return "".join(lines)


def build_finetune_panel(service) -> FinetuneJob:
    """The panel and its API endpoints, in the Blocks being built; returns the app's FinetuneJob."""
    job = FinetuneJob(service.log_path, service.slots, native_key(service.slots),
                      config=service.settings.finetune_config)
    service.finetune = job  # tests and shutdown reach it through the service

    with gr.Accordion("Fine-tune on your conversations", open=False, elem_id="finetune-panel"):
        with gr.Row():
            with gr.Column(scale=2):
                summary = gr.Markdown(job.describe(), elem_id="finetune-summary")
                with gr.Row():
                    only_liked = gr.Checkbox(False, label="Only liked or edited replies", elem_id="finetune-liked")
                    exclude_disliked = gr.Checkbox(True, label="Leave disliked replies out",
                                                   elem_id="finetune-no-disliked")
                with gr.Row():
                    start = gr.Button("Start fine-tuning", variant="primary", elem_id="finetune-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="finetune-cancel")
                with gr.Row():
                    use_base = gr.Button("Use the base model", size="sm", elem_id="finetune-use-base")
                    use_new = gr.Button("Use the fine-tuned model", size="sm", elem_id="finetune-use-new")
                progress = gr.HTML(progress_html(job.status()), elem_id="finetune-status")
                report = gr.Markdown("", elem_id="finetune-report")
            with gr.Column(scale=3):
                plot = gr.LinePlot(loss_frame(job.status()), x="step", y="loss", color="series",
                                   title="Loss", height=260, elem_id="finetune-plot")
        timer = gr.Timer(POLL_S)

    def refresh():
        s = job.status()
        return progress_html(s), loss_frame(s), report_markdown(s)

    def on_start(liked, no_disliked):
        try:
            job.start(only_liked=bool(liked), exclude_disliked=bool(no_disliked))
        except FinetuneRefused as exc:
            gr.Warning(str(exc))
        return refresh()

    def on_cancel():
        job.cancel()
        return refresh()

    def switch(action):
        def run():
            try:
                gr.Info(action())
            except (FinetuneRefused, ValueError) as exc:
                gr.Warning(str(exc))
        return run

    private = dict(api_visibility="private", show_progress="hidden", concurrency_limit=None)
    outputs = [progress, plot, report]
    timer.tick(refresh, None, outputs, **private)
    start.click(on_start, [only_liked, exclude_disliked], outputs, **private)
    cancel.click(on_cancel, None, outputs, **private)
    use_base.click(switch(job.use_base), None, None, **private)
    use_new.click(switch(job.use_finetuned), None, None, **private)
    for box in (only_liked, exclude_disliked):
        box.change(lambda a, b: job.describe(bool(a), bool(b)), [only_liked, exclude_disliked], summary, **private)

    def finetune(only_liked: bool = False, exclude_disliked: bool = True) -> dict:
        """Start fine-tuning the native model on the chat log in the background; returns /finetune_status.

        Args:
            only_liked: learn only replies the user liked or edited.
            exclude_disliked: leave out replies the user disliked (unless edited).
        """
        try:
            job.start(only_liked=bool(only_liked), exclude_disliked=bool(exclude_disliked))
        except FinetuneRefused as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return job.status()

    def finetune_status() -> dict:
        """The current or last run: state (idle|running|done|failed|cancelled), step, total, train_loss,
        val_loss, checkpoint, message, phase, losses, evals, report (recall and retention), base."""
        return job.status()

    def finetune_cancel() -> dict:
        """Stop the running fine-tune after its current step; the model in use does not change."""
        return job.cancel()

    gr.api(finetune, api_name="finetune", concurrency_limit=None)
    gr.api(finetune_status, api_name="finetune_status", concurrency_limit=None)
    gr.api(finetune_cancel, api_name="finetune_cancel", concurrency_limit=None)
    return job
