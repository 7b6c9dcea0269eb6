"""Sans-IO protocol codecs (bytes ⇄ events). No module here imports asyncio or does I/O."""

from typing import Final


class NeedData:
    """The codec's answer when the buffer holds no complete event: feed more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: no complete event in the buffer: feed more bytes (one sentinel for every codec)
NEED_DATA: Final = NeedData()
