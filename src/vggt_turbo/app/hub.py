"""The checkpoint file that ``VGGT.from_pretrained`` would load, found without building the model.

Why: ``from_pretrained`` (huggingface_hub's ``PyTorchModelHubMixin``) constructs ``VGGT(**config)`` on the CPU,
initialising 1.2 B random parameters there, then loads the checkpoint into them and leaves the move to the device
to the caller: for the default weights (``facebook/VGGT-1B``) most of the model phase, before a single weight is
read. Finding the same file (a folder's ``model.safetensors``, or the Hub's cached download of it, downloaded once)
lets ``weights.Plan.build`` assign it to the meta-device skeleton and copy it onto the device, as it does for a
local checkpoint.

The same model: the mixin's own file (``model.safetensors`` is the first it tries) and only when the saved
``config.json`` asks for upstream's default model (every key one of ``VGGT.__init__``'s parameters with its default
value); anything else — no safetensors file (the mixin would try ``pytorch_model.bin``), another configuration —
returns None, and the caller uses ``from_pretrained`` itself. Errors of the Hub (network, unknown repository) are
raised as they come, for the caller to turn into one line.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

WEIGHTS_FILE = "model.safetensors"  # huggingface_hub.constants.SAFETENSORS_SINGLE_FILE
CONFIG_FILE = "config.json"  # huggingface_hub.constants.CONFIG_NAME


def pretrained_checkpoint(source: str) -> Optional[Path]:
    """The local path of the safetensors file ``VGGT.from_pretrained(source)`` loads, or None where this cannot
    stand in for it (see the module's docstring). ``source`` is a folder or a Hugging Face id."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        weights: Optional[Path] = folder / WEIGHTS_FILE
        config: Optional[Path] = folder / CONFIG_FILE
    else:
        weights, config = _download(source, WEIGHTS_FILE), _download(source, CONFIG_FILE)
    if weights is None or not weights.is_file():
        return None
    if config is not None and config.is_file() and not is_default_config(json.loads(config.read_text())):
        return None
    return weights


def is_default_config(config: Any) -> bool:
    """Whether ``config`` (a saved ``config.json``) builds upstream's default ``VGGT()``."""
    from vggt.models.vggt import VGGT

    defaults = {name: p.default for name, p in inspect.signature(VGGT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return isinstance(config, dict) and all(key in defaults and defaults[key] == value for key, value in config.items())


def _download(repo: str, filename: str) -> Optional[Path]:
    """``filename`` of the Hub repository ``repo`` in the local cache (downloaded if need be); None if the
    repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError:  # not in the cache and the Hub not reachable: the caller's error, not "no file"
        raise
    except EntryNotFoundError:
        return None
