"""The correction contract (tests/corrections/test_contract.py) run on ``TFMQConfig`` explicitly.

The contract module parametrises over the corrections registered when it is imported, which depends on what other
test modules imported before it; this runs each of its tests on TFMQ whatever the collection order.
"""

from __future__ import annotations

import inspect

import pytest
import tests.corrections.test_contract as contract

from tadq.registry import correction_for, registered_corrections
from tadq.tfmq import TFMQConfig, TFMQCorrection

TESTS = sorted(name for name in dir(contract.TestCorrectionContract) if name.startswith("test_"))


def test_tfmq_is_registered():
    assert registered_corrections()[TFMQConfig] is TFMQCorrection
    assert isinstance(correction_for(TFMQConfig()), TFMQCorrection)


@pytest.mark.parametrize("name", TESTS)
def test_tfmq_meets_the_correction_contract(name, tmp_path):
    method = getattr(contract.TestCorrectionContract(), name)
    arguments = {"config_type": TFMQConfig, "tmp_path": tmp_path}
    method(**{key: arguments[key] for key in inspect.signature(method).parameters})
