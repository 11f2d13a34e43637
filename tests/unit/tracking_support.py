"""Read back what the trackers stored, from each library's own local files: wandb's offline run, trackio's local
database, TensorBoard's event files. Nothing is mocked: a metric that did not reach the library is not there."""

import json
import struct
import time
from pathlib import Path

WANDB_BLOCK = 32 * 1024  # the LevelDB log format wandb's transaction log (.wandb) uses
WANDB_HEADER = b":W&B\xe1\xbe\x00"  # ident, magic 0xBEE1, version 0


def wandb_offline_runs(wandb_dir) -> list[Path]:
    """The `.wandb` files of the offline runs in `wandb_dir` (`wandb.init(dir=...)`), oldest first."""
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))


def wandb_records(path, *, timeout: float = 30.0) -> list:
    """Every record (`wandb_internal_pb2.Record`) in a `.wandb` transaction log, once it ends with the run's exit
    record: wandb's core process writes the file, and may still be flushing it when `finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        data = Path(path).read_bytes()
        assert WANDB_HEADER.startswith(data[:len(WANDB_HEADER)]), f"{path}: not a wandb transaction log"
        records = _read_records(data)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout} s ({len(records)} records)")
        time.sleep(0.05)


def _read_records(data: bytes) -> list:
    from wandb.proto import wandb_internal_pb2

    """The complete records in `data` (a file still being written may end in a partial one)."""
    pos, chunks, records = len(WANDB_HEADER), [], []
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def wandb_history(path) -> list[dict]:
    """The rows `run.log` wrote, as dicts (wandb's own `_step`, `_runtime`, `_timestamp` left out)."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def wandb_run_info(path) -> dict:
    """project, name and config of the run in a `.wandb` file."""
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            return {"project": run.project, "name": run.display_name, "config": config}
    raise AssertionError(f"{path} holds no run record")


def trackio_logs(project: str, name: str) -> list[dict]:
    """The rows trackio stored locally (TRACKIO_DIR) for run `name` of `project`, trackio's timestamp left out."""
    from trackio.sqlite_storage import SQLiteStorage

    return [{k: v for k, v in row.items() if k != "timestamp"} for row in SQLiteStorage.get_logs(project, name)]


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
