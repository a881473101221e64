"""Validate Axolotl configs as `axolotl train` does (`load_cfg`), in one process; run with the Axolotl venv's python.

Prints one JSON line per config: {"path", "ok", "sam": {the sam_* values} or "error": the message}.
"""

from __future__ import annotations

import json
import sys

from axolotl.cli.config import load_cfg


def main(paths: list[str]) -> None:
    for path in paths:
        try:
            cfg = load_cfg(path)
        except Exception as err:  # Axolotl raises pydantic's ValidationError, or ValueError
            print(json.dumps({"path": path, "ok": False, "error": str(err)}), flush=True)
        else:
            sam = {k: v for k, v in cfg.items() if k.startswith("sam_")}
            print(json.dumps({"path": path, "ok": True, "sam": sam}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
