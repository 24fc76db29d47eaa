"""Training for the native engine: fine-tuning on the chat log and pretraining from text.

    python -m training.finetune --history chat_history.jsonl --base latest      # see --help
    python -m training.pretrain --text input.txt --out models/native/scratch

config.py (hyperparameters), data.py (chat log / text -> memory-mapped token and mask arrays), batches.py,
loop.py (the shared training loop), outputs.py (checkpoint, meta.json, loss curve, resume state), lora.py,
run.py (what both commands share), finetune.py and pretrain.py (the entry points). Imports gpt/ only.
"""
