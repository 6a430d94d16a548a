from __future__ import annotations

from typing import Any

import pytest

from tests.contract import SystemContract


class TestTinyExpertContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any) -> Any:
        return tiny_expert


@pytest.fixture(scope="module")
def tiny_plain_expert(tiny_plain_model_dir: Any) -> Any:
    from collab.experts import Expert

    return Expert.load(tiny_plain_model_dir, name="tiny-plain")


class TestTinyPlainExpertContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_plain_expert: Any) -> Any:
        return tiny_plain_expert
