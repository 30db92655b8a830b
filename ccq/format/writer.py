"""The packed checkpoint folder, written atomically and resumably.

Everything goes to a sibling work folder `.<out>.ccq-partial/`: each shard is written to a
temporary name and renamed once complete, and `state.json` (also replaced atomically)
records which shards are done and under which run fingerprint. Only when every shard, the
index, config.json, the report and the copied tokenizer/processor files are there is the
work folder renamed to `out`. A killed run leaves the work folder for `--resume`; a run
that fails on bad input removes it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .source import INDEX, read_json

SHARD = "model-{:05d}-of-{:05d}.safetensors"
REPORT = "quantization_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index.json")
SKIP_FILES = {"config.json", INDEX, REPORT}


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file that appears under its name only once fully written."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; make them like any other output file
    os.replace(tmp, path)


def _non_empty(p: Path) -> bool:
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


class CheckpointWriter:
    """Shards numbered 0..n-1 written in any order; `finish` publishes the folder."""

    def __init__(self, out_dir: str | Path, num_shards: int, fingerprint: str, *, overwrite=False, resume=False):
        self.out = Path(out_dir)
        self.work = self.out.parent / f".{self.out.name}.ccq-partial"
        self.n = num_shards
        self.fingerprint = fingerprint
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"output {self.out} exists and is not a folder")
        if _non_empty(self.out) and not overwrite:
            raise FileExistsError(f"output {self.out} is not empty; pass --overwrite to replace it")
        state_path = self.work / "state.json"
        if resume:
            if not state_path.exists():
                raise FileNotFoundError(f"nothing to resume: {self.work} has no state.json")
            state = read_json(state_path)
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"cannot resume into {self.out}: the inputs or options differ from the "
                                 f"interrupted run (fingerprint {state.get('fingerprint')} != {fingerprint})")
            self.state = state
        else:
            if self.work.exists():
                shutil.rmtree(self.work)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.work.mkdir()
            self.state = {"fingerprint": fingerprint, "shards": {}}
            write_json_atomic(state_path, self.state)

    def shard_name(self, i: int) -> str:
        return SHARD.format(i + 1, self.n)

    def done(self, i: int) -> bool:
        return str(i) in self.state["shards"] and (self.work / self.shard_name(i)).exists()

    def report_of(self, i: int) -> list:
        return self.state["shards"][str(i)]["report"]

    def write_shard(self, i: int, tensors: dict[str, torch.Tensor], report: list) -> None:
        """Write shard i, then record it (with its report entries) as done."""
        save_tensors_atomic(self.work / self.shard_name(i), tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.state["shards"][str(i)] = {"keys": sorted(tensors), "bytes": nbytes, "report": report}
        write_json_atomic(self.work / "state.json", self.state)

    def path(self, name: str) -> Path:
        """A scratch file inside the work folder (e.g. saved calibration activations)."""
        return self.work / name

    def finish(self, config: dict, report: dict, copy_from: Path | None = None) -> Path:
        """Write index, config, report, copy tokenizer/processor files, publish `out`."""
        weight_map, total = {}, 0
        for i in range(self.n):
            if not self.done(i):
                raise RuntimeError(f"shard {self.shard_name(i)} was never written")
            for k in self.state["shards"][str(i)]["keys"]:
                weight_map[k] = self.shard_name(i)
            total += self.state["shards"][str(i)]["bytes"]
        write_json_atomic(self.work / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json_atomic(self.work / "config.json", config)
        write_json_atomic(self.work / REPORT, report)
        if copy_from is not None:
            for f in sorted(Path(copy_from).iterdir()):
                if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copyfile(f, self.work / f.name)
        for scratch in self.work.iterdir():
            if scratch.name == "state.json" or scratch.name.startswith("calib-"):
                scratch.unlink()
        trash = None
        if self.out.exists():
            trash = self.out.parent / f".{self.out.name}.ccq-old"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(self.out, trash)
        os.replace(self.work, self.out)
        if trash is not None:
            shutil.rmtree(trash)
        return self.out

    def abort(self) -> None:
        """Remove the work folder (bad input: leave nothing behind)."""
        shutil.rmtree(self.work, ignore_errors=True)
