"""transformers' torchvision-fallback note is not printed by tadq's text-to-image commands; other notes are."""

from __future__ import annotations

import logging

from tadq.pipelines.components import TORCHVISION_FALLBACK_NOTE


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_torchvision_fallback_note_is_dropped():
    target = logging.getLogger("transformers.utils.import_utils")
    handler = _Collect()
    target.addHandler(handler)
    try:
        target.warning("`CLIPImageProcessor` %s `CLIPImageProcessorPil` for backward compatibility.",
                       TORCHVISION_FALLBACK_NOTE)
        target.warning("another note")
    finally:
        target.removeHandler(handler)
    assert handler.messages == ["another note"]


def test_the_filter_sits_on_the_logger_transformers_warns_through():
    """The logger the note is written to (transformers' own module object), not one of the same name made later."""
    from transformers.utils import import_utils

    target = import_utils.logger
    handler = _Collect()
    target.addHandler(handler)
    try:
        target.warning("`SiglipImageProcessor` %s `SiglipImageProcessorPil`.", TORCHVISION_FALLBACK_NOTE)
    finally:
        target.removeHandler(handler)
    assert handler.messages == []
