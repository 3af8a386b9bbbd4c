"""Read TensorBoard event files back without TensorBoard's reader: the TFRecord framing (length, CRC, data, CRC)
parsed by hand, each record an `Event` protobuf."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def read_scalars(directory: str | Path) -> list[tuple[int, str, float]]:
    """Every scalar in `directory`'s event files, oldest file first: (step, tag, value) in writing order."""
    points = []
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            payload = data[at + 12:at + 12 + length]  # after the length (8 bytes) and its CRC (4)
            assert len(payload) == length, f"{path} is cut short"
            at += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                points.append((event.step, value.tag, value.simple_value))
    return points
