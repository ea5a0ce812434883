"""Fixtures of the Triton op tests; helpers live in triton_test_utils.py."""

from __future__ import annotations

import pytest
import torch

from triton_test_utils import DEVICE


@pytest.fixture
def device() -> torch.device:
    return DEVICE
