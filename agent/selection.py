"""Which files of a snapshot to pull: everything, or only what vLLM will read (mirroring vLLM 0.32.0,
the release in `agent.serving.release`; 0.33.0's rules are the same).

The rule set, from vLLM's source:

- `model_executor/model_loader/default_loader.py` (`DefaultModelLoader._prepare_weights`):
  `load_format="auto"` becomes `"mistral"` when any file of the repo has a basename matching
  `consolidated*.safetensors` (`repo_utils.list_filtered_repo_files`; offline, vLLM first resolves the
  id to the local snapshot folder, so this is over the files present), else `"hf"`. The format gives
  glob patterns, tried in order at the top level of the snapshot (`glob.glob`, so dotfiles never
  match); the first pattern with any match wins:
  `hf` -> `*.safetensors`, `*.bin`, `*.pt`; `safetensors` (also `fastsafetensors`, `instanttensor`)
  -> `*.safetensors`; `mistral` -> `consolidated*.safetensors`; `pt` -> `*.pt`; `npcache` -> `*.bin`,
  `*.pt`. (`*.pt` is the `fall_back_to_pt` pattern, which models leave on by default and which is
  never added to the safetensors formats.) A match of a `.safetensors` pattern turns on the
  safetensors path.
- `weight_utils.filter_duplicate_safetensors_files`: on the safetensors path, when the index
  (`model.safetensors.index.json`, for `mistral` `consolidated.safetensors.index.json`) exists, only
  files named in its `weight_map` are kept, and a file it names that is missing is an error.
- `weight_utils.filter_files_not_needed_for_inference`: otherwise `training_args.bin`,
  `optimizer.bin`, `optimizer.pt`, `scheduler.pt`, `scaler.pt` are dropped.
- `config/load.py`: the default `ignore_patterns` is `["original/**/*"]`. (Through huggingface_hub's
  `fnmatch` that pattern only matches two folders deep, so it does not itself keep out
  `original/consolidated.00.pth`; vLLM never reads anything under `original/` all the same, since
  weights are globbed at the top level and configs and tokenizers are read by top-level name. The
  selection skips the whole folder.)
- `transformers_utils/config.py` and `tokenizers/registry.py`: with `consolidated*.safetensors`
  present, a `params.json` makes vLLM read a Mistral config, and `tekken.json` / `tokenizer.model.v*`
  a Mistral tokenizer. A subset therefore keeps `params.json` exactly when it keeps top-level
  `consolidated*.safetensors` ("both or neither").

What the `vllm` selection skips: top-level weight files (by suffix) those rules do not pick, the
index of a weight set that is skipped (an index naming absent shards would make vLLM raise), a
`params.json` without its consolidated weights, and `original/**`. Everything else is pulled:
configs, tokenizer files, chat templates, `*.tiktoken`, `*.py` for `trust_remote_code`, the
generation config, and weight files in other subfolders (vLLM reads some through `subfolder`
sources and sentence-transformers modules). When the rules would leave vLLM no weights at all (it
would fail to start), the selection keeps every file and says so, rather than guess.

`--include` / `--exclude` then narrow the result with huggingface_hub's `allow_patterns` /
`ignore_patterns` semantics (`fnmatch`, `*` crosses `/`, a trailing `/` means the whole folder).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from huggingface_hub.utils import filter_repo_objects

from agent.serving.release import VLLM_RELEASE

VLLM_VERSION = VLLM_RELEASE
FILES_CHOICES = ("vllm", "all")
LOAD_FORMATS = ("auto", "safetensors", "mistral", "pt")  # what the agent's own --load-format offers
MISTRAL_WEIGHTS = "consolidated*.safetensors"
MISTRAL_CONFIG = "params.json"
IGNORED_FOLDER = "original/"  # LoadConfig.ignore_patterns' default is "original/**/*": see above
NOT_FOR_INFERENCE = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# Suffixes of checkpoint files of any framework: vLLM reads the top-level ones only through the patterns.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx",
                   ".onnx_data", ".gguf", ".tflite", ".npz")
INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class FormatRule:
    patterns: tuple[str, ...]
    safetensors: bool  # starts on the safetensors path (the index filter) whatever matched
    index: str = "model.safetensors.index.json"


RULES: dict[str, FormatRule] = {
    "hf": FormatRule(("*.safetensors", "*.bin", "*.pt"), False),
    "safetensors": FormatRule(("*.safetensors",), True),
    "mistral": FormatRule((MISTRAL_WEIGHTS,), True, "consolidated.safetensors.index.json"),
    "pt": FormatRule(("*.pt",), False),
    "npcache": FormatRule(("*.bin", "*.pt"), False),
}
ALIASES = {"fastsafetensors": "safetensors", "instanttensor": "safetensors"}
# Load formats whose file choice is mirrored here; any other (dummy, tensorizer, runai_streamer, ...)
# reads files this module does not know about, so the selection keeps everything.
MIRRORED = frozenset({"auto", *RULES, *ALIASES})

IndexReader = Callable[[str], "bytes | None"]


@dataclass(frozen=True)
class Selection:
    """What the user asked for: `files` is `vllm` or `all`; the rest narrows it further."""

    files: str = "all"
    load_format: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return self.files == "all" and not self.include and not self.exclude

    def describe(self) -> dict[str, object]:
        return {"files": self.files, "load_format": self.load_format, "include": list(self.include),
                "exclude": list(self.exclude), "vllm_version": VLLM_VERSION}


@dataclass(frozen=True)
class Choice:
    """The outcome: the paths to pull, each skipped path with why, and the format vLLM will use."""

    keep: frozenset[str]
    skipped: Mapping[str, str] = field(default_factory=dict)
    load_format: str = ""  # the format the rules resolved to ("hf", "mistral", ...); "" when not used
    notes: tuple[str, ...] = ()


class NoWeights(Exception):
    """vLLM would find no weights (or raise) on this repo with this format: why, in a few words."""


def is_top_level(path: str) -> bool:
    return "/" not in path


def is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)


def _ignored(path: str) -> bool:
    return path.startswith(IGNORED_FOLDER)


def resolve_format(paths: Iterable[str], load_format: str) -> str:
    """`auto` -> `mistral` when a placed file's basename matches consolidated*.safetensors, else `hf`."""
    load_format = ALIASES.get(load_format, load_format)
    if load_format != "auto":
        return load_format
    present = (p for p in paths if not _ignored(p))
    return "mistral" if any(fnmatchcase(posixpath.basename(p), MISTRAL_WEIGHTS) for p in present) else "hf"


def _glob_top_level(paths: Iterable[str], pattern: str) -> list[str]:
    """What `glob.glob(os.path.join(folder, pattern))` finds: top-level names, no dotfiles."""
    return sorted(p for p in paths if is_top_level(p) and not p.startswith(".") and fnmatchcase(p, pattern))


def _index_files(data: bytes, index: str) -> set[str]:
    try:
        weight_map = json.loads(data)["weight_map"]
        return {str(name) for name in weight_map.values()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NoWeights(f"{index} has no readable weight_map ({type(exc).__name__})") from None


@dataclass(frozen=True)
class Weights:
    load_format: str  # resolved: never "auto"
    files: tuple[str, ...]  # what DefaultModelLoader._prepare_weights would return
    index: str | None  # the index it filtered them with, when it read one


def vllm_weights(paths: Iterable[str], load_format: str, read_index: IndexReader) -> Weights:
    """The weight files vLLM's DefaultModelLoader would load; NoWeights when it would find none."""
    paths = sorted(paths)
    resolved = resolve_format(paths, load_format)
    rule = RULES.get(resolved)
    if rule is None:
        raise NoWeights(f"load format {load_format!r} is not one vLLM {VLLM_VERSION}'s default loader reads")
    found: list[str] = []
    use_safetensors = rule.safetensors
    index_used = None
    for pattern in rule.patterns:
        found = _glob_top_level(paths, pattern)
        if found:
            use_safetensors |= pattern.endswith(".safetensors")
            break
    if use_safetensors:
        if rule.index in paths:
            data = read_index(rule.index)
            if data is None:
                raise NoWeights(f"{rule.index} could not be read")
            named = _index_files(data, rule.index)
            missing = named - set(found)
            if missing:
                raise NoWeights(f"{rule.index} names weight files that are not there: {sorted(missing)[:3]}")
            found = [p for p in found if p in named]
            index_used = rule.index
    else:
        found = [p for p in found if not p.endswith(NOT_FOR_INFERENCE)]
    if not found:
        raise NoWeights(f"no weight files for load format {resolved!r}")
    return Weights(resolved, tuple(found), index_used)


def _index_belongs(index: str, weights: Iterable[str]) -> bool:
    """Whether a kept weight file is one `<name>.<ext>.index.json` indexes: `<name>.<ext>` itself or a
    shard `<name>-*.<ext>` (the names save_pretrained gives)."""
    indexed = index[: -len(INDEX_SUFFIX)]
    stem, ext = posixpath.splitext(indexed)
    return any(w == indexed or fnmatchcase(w, f"{stem}-*{ext}") for w in weights)


def _vllm_skips(paths: list[str], weights: Weights) -> dict[str, str]:
    """path -> why, for every path the vllm selection leaves out."""
    chosen = set(weights.files)
    keeps_consolidated = any(fnmatchcase(w, MISTRAL_WEIGHTS) for w in chosen)
    skipped: dict[str, str] = {}
    for path in paths:
        if _ignored(path):
            skipped[path] = "original/** is in vLLM's ignore_patterns"
        elif not is_top_level(path) or path in chosen:
            continue
        elif is_weight_file(path):
            skipped[path] = f"weights vLLM's {weights.load_format!r} load format does not read"
        elif path.endswith(INDEX_SUFFIX) and is_weight_file(path[: -len(INDEX_SUFFIX)]) \
                and path != weights.index and not _index_belongs(path, chosen):
            skipped[path] = "index of weights that are skipped"
        elif path == MISTRAL_CONFIG and not keeps_consolidated:
            skipped[path] = "Mistral config without its consolidated*.safetensors (both or neither)"
    return skipped


def _consistency_notes(keep: set[str]) -> list[str]:
    consolidated = any(is_top_level(p) and fnmatchcase(p, MISTRAL_WEIGHTS) for p in keep)
    if consolidated != (MISTRAL_CONFIG in keep):
        have, lack = ("consolidated*.safetensors", "params.json") if consolidated \
            else ("params.json", "consolidated*.safetensors")
        return [f"the selection holds {have} but not {lack}: vLLM may read a config that does not fit the "
                "weights"]
    return []


def choose(paths: Iterable[str], selection: Selection, read_index: IndexReader) -> Choice:
    """Apply the selection to a snapshot's paths; `read_index` returns a small file's bytes (the
    safetensors index), and is called only when the rules need it."""
    paths = sorted(paths)
    skipped: dict[str, str] = {}
    notes: list[str] = []
    resolved = ""
    if selection.files == "vllm":
        if selection.load_format not in MIRRORED:
            notes.append(f"vLLM's load format {selection.load_format!r} is not mirrored: pulling every file")
        else:
            try:
                weights = vllm_weights(paths, selection.load_format, read_index)
                skipped = _vllm_skips(paths, weights)
                resolved = weights.load_format
            except NoWeights as exc:
                notes.append(f"vLLM {VLLM_VERSION} would find no weights ({exc}): pulling every file")
    keep = [p for p in paths if p not in skipped]
    allowed = set(filter_repo_objects(keep, allow_patterns=list(selection.include) or None,
                                      ignore_patterns=list(selection.exclude) or None))
    for path in keep:
        if path not in allowed:
            skipped[path] = "left out by --include/--exclude"
    kept = set(allowed)
    if selection.files == "vllm" or selection.include or selection.exclude:
        notes += _consistency_notes(kept)
    return Choice(frozenset(kept), dict(sorted(skipped.items())), resolved, tuple(notes))
