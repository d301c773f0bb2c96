"""Shared test set-up: nothing is downloaded, and Triton kernels run in its interpreter when there is no GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
