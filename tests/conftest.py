"""Test-wide settings: never touch the Hugging Face hub, never use the user's data folder."""

import os

# Set before anything imports huggingface_hub: a hub lookup without these hangs instead of failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("ATELIER_MODEL_PATH", None)
