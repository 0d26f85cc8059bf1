"""Fixtures shared by the engine tests that run the host paths on the tiny preset."""

import jax.numpy as jnp
import pytest

from rtpjax.models.presets import preset, random_params
from rtpjax.sharding.mesh import make_mesh
from rtpjax.tokenizer import Tokenizer
from tests.conftest import FIXTURES


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tokenizer" / "smollm2")


@pytest.fixture(scope="session")
def tiny_model():
    """(config, float32 random weights) of the tiny preset."""
    cfg = preset("tiny")
    return cfg, random_params(cfg, jnp.float32, make_mesh(1))
