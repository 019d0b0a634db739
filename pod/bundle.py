"""The export bundle: the self-contained directory a server needs, and nothing else.

`bundle.json` lists every file with its SHA-256 and size; `Bundle.load` checks them all before anything is
used, so a missing, truncated or tampered file stops start-up with a message naming it. No torch here.

Files: `encoder_<task>.onnx` (one per task, prompts folded in), `decoder_step.onnx` (returns hidden states),
`output_columns.onnx` / `output_full.onnx` (hidden states -> logits of the requested tokens / of all),
`spiece.model` and, when items are not written as digits, `items.json` (how each item is written: see
`pod.items`; `bundle.json`'s `item_ids` names the mode),
`catalog.json` (raw <-> internal IDs and each item's target tokens, from which the prefix trie is built),
`histories.txt` (`user item item ...`, the known sequences, for requests without a history).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

BUNDLE_FORMAT = "pod-bundle"
BUNDLE_VERSION = 3  # 2: decoder step returns hidden states; output_*.onnx project them. 3: item_ids, items.json
READABLE_VERSIONS = (2, 3)  # a version-2 bundle is a digits bundle


class BundleError(ValueError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


@dataclass
class Bundle:
    root: Path
    manifest: dict
    id2user: dict[int, str]
    id2item: dict[int, str]
    item_tokens: dict[int, list[int]]
    histories: dict[int, list[int]]

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> Bundle:
        root = Path(root)
        manifest_file = root / "bundle.json"
        if not manifest_file.is_file():
            raise BundleError(f"{manifest_file}: missing; is {root} a bundle written by `pod export`?")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{manifest_file}: not valid JSON ({exc})") from None
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") not in READABLE_VERSIONS:
            raise BundleError(
                f"{manifest_file}: unsupported bundle format {manifest.get('format')!r} "
                f"version {manifest.get('version')!r} (this release reads version {BUNDLE_VERSION}; "
                "re-run `pod export` on the checkpoint)"
            )
        if verify:
            for name, entry in manifest["files"].items():
                path = root / name
                if not path.is_file():
                    raise BundleError(f"{path}: missing from the bundle")
                size = path.stat().st_size
                if size != entry["bytes"]:
                    raise BundleError(f"{path}: {size} bytes, bundle.json says {entry['bytes']} (truncated?)")
                if sha256(path) != entry["sha256"]:
                    raise BundleError(f"{path}: SHA-256 does not match bundle.json (modified or corrupted)")
        catalog = json.loads((root / "catalog.json").read_text())
        histories = {}
        for line in (root / "histories.txt").read_text().splitlines():
            nums = [int(x) for x in line.split()]
            if nums:
                histories[nums[0]] = nums[1:]
        return cls(
            root=root,
            manifest=manifest,
            id2user={int(k): v for k, v in catalog["id2user"].items()},
            id2item={int(k): v for k, v in catalog["id2item"].items()},
            item_tokens={int(k): v for k, v in catalog["item_tokens"].items()},
            histories=histories,
        )

    def path(self, name: str) -> Path:
        return self.root / name
