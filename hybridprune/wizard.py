"""The seed card's decision tree as questions: answers -> a resolved configuration, nothing run.

`ask_answers` asks the questions (questionary, through a `Prompter` that tests drive with a
pipe input); `command_options` turns the answers into the `hybridprune prune` flags, from which
both the equivalent command line (`build_command`) and the keyword arguments of `api.prune`
(`prune_kwargs`) are made, so the two can never disagree. Running is the command module's
business (cli/wizard_cmd.py calls the same api.prune as `hybridprune prune`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hybridprune.config import DEFAULT_CALIBRATION_DATA, DEFAULT_EVAL_WINDOWS, DEFAULT_SEQLEN, PruneConfig, default_of
from hybridprune.env import network_allowed
from hybridprune.errors import UserError
from hybridprune.estimates import (
    EMBEDDED_UNPACK_SECONDS,
    calibration_estimate,
    embedded_config,
    embedded_ready,
    estimate_text,
    format_count,
    format_seconds,
    hub_config,
    parameter_count,
    pass_seconds,
    read_json,
)
from hybridprune.presets import DEFAULT_PRESET, Preset, check_name, load_presets, resolve

EMBEDDED = "embedded"
FOLDER = "folder"
HUB = "hub"
CALIBRATION_TEXT = DEFAULT_CALIBRATION_DATA
SEQLEN = DEFAULT_SEQLEN
EVAL_WINDOWS = DEFAULT_EVAL_WINDOWS
DEFAULT_NSAMPLES = default_of("nsamples")  # the benchmark's calibration size
NSAMPLES_CHOICES = (DEFAULT_NSAMPLES, 2 * DEFAULT_NSAMPLES, 4 * DEFAULT_NSAMPLES)

# "What matters most" -> preset, in the order of the card's configuration matrix, with its "Use When".
PRIORITIES: tuple[tuple[str, str, str], ...] = (
    ("balanced", "Balanced", "the default choice"),
    ("quality", "Quality", "when quality matters most"),
    ("fast", "Speed", "for quick iteration"),
    ("conservative", "Conservative", "early layers stay dense"),
)

PATTERNS: tuple[tuple[str, str, float | None], ...] = (
    ("unstructured", "unstructured: any weight may go; the best quality at a given sparsity", None),
    ("2:4", "2:4: two of every four consecutive weights (no maintained runtime runs it faster in 2026)", 0.5),
    ("4:8", "4:8: four of every eight; a little better quality than 2:4", 0.5),
    ("structured", "structured MLP: whole MLP neurons removed; a smaller, faster standard model", None),
)

class Cancelled(Exception):
    """The user pressed Ctrl-C (or the input ended) at a question."""


# --- asking -------------------------------------------------------------------------------


class Prompter:
    """Asks one questionary question at a time; `input`/`output` are prompt_toolkit's (tests pass a pipe).

    Ctrl-C or the end of the input at any question raises Cancelled, never returns None.
    """

    def __init__(self, input: Any = None, output: Any = None):
        self.input = input
        self.output = output

    def before_ask(self) -> None:
        """Hook called just before each question (tests send that question's keys here)."""

    def _io(self) -> dict[str, Any]:
        return {key: value for key, value in (("input", self.input), ("output", self.output)) if value is not None}

    def _ask(self, question: Any) -> Any:
        self.before_ask()
        try:
            answer = question.unsafe_ask()
        except (KeyboardInterrupt, EOFError):
            raise Cancelled from None
        if answer is None:
            raise Cancelled
        return answer

    def select(self, message: str, choices: list[Any], default: Any = None, instruction: str | None = None) -> Any:
        import questionary

        return self._ask(questionary.select(message, choices=choices, default=default, instruction=instruction, **self._io()))

    def text(self, message: str, default: str = "", validate: Any = None, instruction: str | None = None) -> str:
        import questionary

        return self._ask(questionary.text(message, default=default, validate=validate, instruction=instruction, **self._io()))

    def path(self, message: str, default: str = "", validate: Any = None, only_directories: bool = False) -> str:
        import questionary

        return self._ask(
            questionary.path(message, default=default, validate=validate, only_directories=only_directories, **self._io())
        )

    def confirm(self, message: str, default: bool = True) -> bool:
        import questionary

        return bool(self._ask(questionary.confirm(message, default=default, **self._io())))


@dataclass(frozen=True)
class Answers:
    """What the user chose; `model` is None for the embedded model."""

    model_kind: str = EMBEDDED
    model: str | None = None
    preset: str = DEFAULT_PRESET
    sparsity: float = 0.5
    pattern: str = "unstructured"
    nsamples: int = DEFAULT_NSAMPLES
    out: str = ""
    evaluate: bool = False
    data: str = CALIBRATION_TEXT
    cache_dir: str | None = None
    parameters: int | None = None  # the model's size, for the estimates (None: unknown)
    seqlen: int = SEQLEN


def ask_answers(
    prompter: Prompter,
    previous: Answers | None = None,
    data: str | None = None,
    cache_dir: str | None = None,
    presets: dict[str, Preset] | None = None,
    seqlen: int = SEQLEN,
) -> Answers:
    """The decision tree, one question after another; `previous` answers (after "go back") are the defaults."""
    presets = presets if presets is not None else load_presets()
    kind, model, parameters = ask_model(prompter, previous, cache_dir)
    preset = ask_priority(prompter, presets, previous.preset if previous else DEFAULT_PRESET)
    preset_config = resolve({}, presets[preset])
    same_preset = previous is not None and previous.preset == preset
    sparsity = ask_sparsity(prompter, previous.sparsity if previous else preset_config.sparsity)
    pattern = ask_pattern(prompter, sparsity, previous.pattern if same_preset else preset_config.pattern)
    run_config = resolve({"sparsity": sparsity, "pattern": pattern}, presets[preset])
    nsamples = ask_nsamples(
        prompter, previous.nsamples if same_preset else int(presets[preset].calibration.get("nsamples", DEFAULT_NSAMPLES)),
        parameters, kind == EMBEDDED and not embedded_ready(cache_dir), seqlen,
        second_order=bool(run_config.refine or run_config.update),
    )
    chosen_data = data or str(presets[preset].calibration.get("data", CALIBRATION_TEXT))
    suggested = default_out(preset, sparsity, pattern)
    if previous and previous.out != default_out(previous.preset, previous.sparsity, previous.pattern):
        suggested = previous.out  # a folder the user typed survives "go back"
    out = ask_out(prompter, suggested, model if kind == FOLDER else None)
    evaluate = prompter.confirm(
        f"Measure perplexity afterwards (pruned vs dense, {EVAL_WINDOWS} test windows"
        + (f", {estimate_text(2 * pass_seconds(parameters, EVAL_WINDOWS, seqlen))} more" if parameters else "") + ")?",
        default=previous.evaluate if previous else False,
    )
    return Answers(kind, model, preset, sparsity, pattern, nsamples, out, evaluate, chosen_data, cache_dir, parameters, seqlen)


def ask_model(prompter: Prompter, previous: Answers | None, cache_dir: str | None) -> tuple[str, str | None, int | None]:
    from questionary import Choice

    online = network_allowed()
    kind = prompter.select(
        "Which model?",
        choices=[
            Choice("the embedded SmolLM2-135M-Instruct (offline, 135M parameters)", value=EMBEDDED),
            Choice("a local model folder (Hugging Face format)", value=FOLDER),
            Choice("a Hugging Face hub id", value=HUB,
                   disabled=None if online else "offline: set HYBRIDPRUNE_ONLINE=1 to download hub models"),
        ],
        default=previous.model_kind if previous and (previous.model_kind != HUB or online) else EMBEDDED,
    )
    if kind == EMBEDDED:
        return EMBEDDED, None, parameter_count(embedded_config(cache_dir))
    if kind == FOLDER:
        default = previous.model if previous and previous.model_kind == FOLDER and previous.model else ""
        folder = prompter.path("Model folder:", default=default, validate=validate_model_folder, only_directories=True)
        folder = folder.strip()
        return FOLDER, folder, parameter_count(read_json(Path(folder).expanduser() / "config.json"))
    default = previous.model if previous and previous.model_kind == HUB and previous.model else ""
    hub_id = prompter.text("Hub id (owner/name):", default=default, validate=validate_hub_id).strip()
    return HUB, hub_id, parameter_count(hub_config(hub_id))


def ask_priority(prompter: Prompter, presets: dict[str, Preset], default: str) -> str:
    from questionary import Choice

    choices = []
    for name, label, use_when in PRIORITIES:
        if name in presets:
            preset = presets[name]
            choices.append(Choice(f"{label:<13} {preset.trade_off}: {use_when}", value=name, description=preset.description))
    for name, preset in presets.items():
        if name not in {priority[0] for priority in PRIORITIES}:
            label = preset.trade_off if preset.source == "built-in" and preset.trade_off else f"your preset ({preset.source})"
            choices.append(Choice(f"{name:<13} {label}", value=name, description=preset.description or None))
    values = [choice.value for choice in choices]
    return prompter.select("What matters most?", choices=choices, default=default if default in values else values[0])


def ask_sparsity(prompter: Prompter, default: float) -> float:
    answer = prompter.text(
        "Target sparsity (fraction of the decoder weights removed, e.g. 0.5 or 50%):",
        default=f"{default:g}",
        validate=validate_sparsity,
    )
    return parse_sparsity(answer)


def ask_pattern(prompter: Prompter, sparsity: float, default: str) -> str:
    from questionary import Choice

    choices = []
    for value, title, needs in PATTERNS:
        blocked = needs is not None and abs(needs - sparsity) > 1e-9
        choices.append(Choice(title, value=value, disabled=f"needs sparsity {needs:g}" if blocked else None))
    allowed = [choice.value for choice in choices if not choice.disabled]
    return prompter.select("Sparsity pattern:", choices=choices, default=default if default in allowed else "unstructured")


def ask_nsamples(
    prompter: Prompter, default: int, parameters: int | None, unpack: bool, seqlen: int = SEQLEN, second_order: bool = False
) -> int:
    from questionary import Choice

    choices = []
    for windows in sorted({*NSAMPLES_CHOICES, default}):
        choices.append(Choice(f"{windows:>3} windows x {seqlen} tokens{' (the benchmark size)' if windows == DEFAULT_NSAMPLES else ''}: "
                              f"{calibration_estimate(parameters, windows, seqlen, second_order)}", value=windows))
    instruction = "(estimated at this machine's current speed; instant when cached"
    instruction += f"; +{format_seconds(EMBEDDED_UNPACK_SECONDS)} once to unpack the embedded model)" if unpack else ")"
    return prompter.select("Calibration size:", choices=choices, default=default, instruction=instruction)


def ask_out(prompter: Prompter, default: str, model_folder: str | None) -> str:
    return prompter.path(
        "Save the pruned model to:",
        default=default,
        validate=lambda text: validate_out(text, model_folder),
        only_directories=True,
    ).strip()


# --- validation (True, or the message shown under the prompt) -------------------------------


def parse_sparsity(text: str) -> float:
    text = text.strip()
    percent = text.endswith("%")
    try:
        value = float(text.rstrip("%").strip())
    except ValueError:
        raise UserError(f"'{text}' is not a number: type a fraction such as 0.5 (or 50%)") from None
    if percent:
        value /= 100.0
    if not 0.0 < value < 1.0:
        raise UserError(f"{text} is out of range: the sparsity is a fraction strictly between 0 and 1 (e.g. 0.5)")
    return round(value, 6)


def validate_sparsity(text: str) -> bool | str:
    try:
        parse_sparsity(text)
    except UserError as err:
        return str(err)
    return True


def validate_model_folder(text: str) -> bool | str:
    from hybridprune.models.adapters import adapter_for

    if not text.strip():
        return "type the path of a model folder (Tab completes)"
    folder = Path(text.strip()).expanduser()
    if not folder.is_dir():
        return f"'{text.strip()}' is not a folder"
    config = read_json(folder / "config.json")
    if config is None:
        return f"'{text.strip()}' has no readable config.json: pick a folder written by save_pretrained"
    try:
        compressed = config.get("hybridprune_compressed")  # a compressed folder keeps its model_type there (export.py)
        adapter_for(str(compressed.get("dense_model_type") if isinstance(compressed, dict) else config.get("model_type", "unknown")))
    except UserError as err:
        return str(err)
    if config.get("auto_map"):
        return "this model runs its own code: use `hybridprune prune --trust-remote-code --model ...` instead"
    if not any(path.suffix in (".safetensors", ".bin") for path in folder.iterdir()):
        return f"'{text.strip()}' has a config.json but no weight files (.safetensors / .bin)"
    return True


def validate_hub_id(text: str) -> bool | str:
    from hybridprune.models.loading import _looks_like_hub_id

    text = text.strip()
    if not _looks_like_hub_id(text) or any(part == "" for part in text.split("/")) or " " in text:
        return "a hub id looks like owner/name, e.g. HuggingFaceTB/SmolLM2-135M"
    return True


def validate_out(text: str, model_folder: str | None = None) -> bool | str:
    if not text.strip():
        return "type a folder to save the pruned model in"
    out = Path(text.strip()).expanduser()
    if out.is_symlink():
        return f"'{text.strip()}' is a symbolic link: choose a real folder"
    if out.exists() and not out.is_dir():
        return f"'{text.strip()}' exists and is not a folder"
    if out.is_dir() and any(out.iterdir()):
        return f"'{text.strip()}' exists and is not empty: choose another folder"
    if model_folder:
        resolved, source = out.resolve(), Path(model_folder).expanduser().resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            return "that overlaps the input model folder: choose another folder"
    return True


def default_out(preset: str, sparsity: float, pattern: str, base: Path | None = None) -> str:
    """./pruned-<preset>-s<sparsity>[-<pattern>], moved to a free name if that one is taken."""
    name = f"pruned-{preset}-s{sparsity:g}" + ("" if pattern == "unstructured" else "-" + pattern.replace(":", "of"))
    base = base or Path.cwd()
    candidate, number = name, 1
    while (base / candidate).exists() and (not (base / candidate).is_dir() or any((base / candidate).iterdir())):
        number += 1
        candidate = f"{name}-{number}"
    return f"./{candidate}"


# --- answers -> flags -> command line / keyword arguments -----------------------------------


def command_options(answers: Answers, presets: dict[str, Preset] | None = None) -> list[tuple[str, str, Any]]:
    """(flag, prune keyword, value) for the equivalent `prune` run: --preset, --sparsity and --out always,
    the rest only where the answer differs from what the preset (or the built-in default) gives."""
    presets = presets if presets is not None else load_presets()
    preset = presets.get(answers.preset)
    config = resolve({}, preset) if preset else PruneConfig()
    calibration = preset.calibration if preset else {}
    options: list[tuple[str, str, Any]] = []
    if answers.model_kind != EMBEDDED and answers.model:
        options.append(("--model", "model", answers.model))
    options.append(("--preset", "preset", answers.preset))
    options.append(("--sparsity", "sparsity", f"{answers.sparsity:g}"))
    if answers.pattern != config.pattern:
        options.append(("--pattern", "pattern", answers.pattern))
    if answers.nsamples != calibration.get("nsamples", DEFAULT_NSAMPLES):
        options.append(("--nsamples", "nsamples", answers.nsamples))
    if answers.seqlen != calibration.get("seqlen", SEQLEN):
        options.append(("--seqlen", "seqlen", answers.seqlen))
    if answers.data != CALIBRATION_TEXT:
        options.append(("--data", "data", answers.data))
    if answers.cache_dir:
        options.append(("--cache-dir", "cache_dir", answers.cache_dir))
    options.append(("--out", "out", answers.out))
    if answers.evaluate:
        options.append(("--eval", "evaluate", True))
    return options


def build_command(answers: Answers, presets: dict[str, Preset] | None = None) -> list[str]:
    """The equivalent non-interactive command line, as argv."""
    argv = ["hybridprune", "prune"]
    for flag, _, value in command_options(answers, presets):
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def command_text(answers: Answers, presets: dict[str, Preset] | None = None) -> str:
    return shlex.join(build_command(answers, presets))


def prune_kwargs(answers: Answers, presets: dict[str, Preset] | None = None) -> dict[str, Any]:
    """Keyword arguments of `api.prune` (the same names as the command's options) for the same run as build_command."""
    paths = {"out", "cache_dir"}
    return {key: Path(value) if key in paths else value for _, key, value in command_options(answers, presets)}


def preset_values(answers: Answers, presets: dict[str, Preset] | None = None) -> dict[str, Any]:
    """The answers as a user preset: the chosen preset's flags plus sparsity, pattern and calibration size."""
    presets = presets if presets is not None else load_presets()
    preset = presets[answers.preset]
    values: dict[str, Any] = {**preset.values, **preset.calibration, "sparsity": answers.sparsity, "pattern": answers.pattern}
    run = resolve({"sparsity": answers.sparsity, "pattern": answers.pattern}, preset)
    if "refine" in values:  # what the run will do: a refine that gives way to the pattern is not saved with it
        values["refine"] = run.refine
    if values.get("layer_spread") and not run.layer_spread:  # nor a layer spread (refused in a preset with N:M)
        del values["layer_spread"]
    if answers.nsamples != DEFAULT_NSAMPLES or "nsamples" in values:
        values["nsamples"] = answers.nsamples
    if answers.seqlen != SEQLEN or "seqlen" in values:
        values["seqlen"] = answers.seqlen
    return values


def validate_new_preset_name(text: str, presets: dict[str, Preset]) -> bool | str:
    try:
        check_name(text.strip())
    except UserError as err:
        return str(err)
    existing = presets.get(text.strip())
    if existing is not None and existing.source == "built-in":
        return f"'{text.strip()}' is a built-in preset: choose another name"
    return True


def with_saved_preset(answers: Answers, name: str) -> Answers:
    """The same run, expressed through the newly saved preset."""
    return replace(answers, preset=name)


def describe(answers: Answers, presets: dict[str, Preset] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the resolved configuration, for the confirmation panel."""
    presets = presets if presets is not None else load_presets()
    preset = presets[answers.preset]
    config = resolve({"sparsity": answers.sparsity, "pattern": answers.pattern}, preset)
    if answers.model_kind == EMBEDDED:
        model = "embedded SmolLM2-135M-Instruct"
    else:
        model = answers.model or ""
    seconds = pass_seconds(answers.parameters, answers.nsamples, answers.seqlen)
    estimate = estimate_text(seconds) if answers.parameters else "time unknown"
    layers = f"; first {config.preserve_first:.0%} of layers kept dense" if config.preserve_first else ""
    rows = [
        ("model", f"{model}  ({format_count(answers.parameters)})"),
        ("preset", f"{preset.name}: {preset.trade_off}" if preset.trade_off else preset.name),
        ("method", f"attention {config.attention_label()}, MLP {config.mlp_label()}{layers}"),
        ("sparsity", f"{answers.sparsity * 100:.4g}%"),
        ("pattern", answers.pattern),
        ("calibration", f"{answers.nsamples} x {answers.seqlen} tokens of {answers.data} ({estimate}, estimate; "
                        "cached statistics are reused)"),
        ("save to", answers.out),
        ("evaluate", f"yes: perplexity pruned vs dense, {EVAL_WINDOWS} test windows" if answers.evaluate else "no"),
    ]
    return rows
