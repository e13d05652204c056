"""Where fmprobe computes: config devices and the CPU threads of head training."""

import pytest
import torch

from fmprobe.devices import config_device, head_threads
from fmprobe.errors import ConfigError


def test_pooled_heads_train_on_one_thread_and_token_heads_keep_the_process_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with head_threads(tokens=False):
            assert torch.get_num_threads() == 1  # small kernels: thread wake-ups would dominate
        assert torch.get_num_threads() == 2
        with head_threads(tokens=True):
            assert torch.get_num_threads() == 2  # attentive heads' kernels are large enough to share
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_device_that_is_not_there_is_an_error_naming_the_key():
    assert config_device("cpu", "features.device") == torch.device("cpu")
    with pytest.raises(ConfigError, match="features.device"):
        config_device("tpu", "features.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="adapt.device: cpu"):
            config_device("cuda", "adapt.device")
