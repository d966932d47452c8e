"""Command palette (Ctrl+P): every console setting as a command named ``area: what``.

Areas: ``sampling:`` (a validated value dialog per parameter), ``quant:``, ``batch:``, ``spec:``,
``attention:``, ``model:``, ``theme:``, ``system prompt:``, ``export:``, ``load:`` and ``chat:``.
An area that the engine reports in ``EngineInfo.unsupported`` is listed dimmed with the reason,
and choosing it only repeats the reason: nothing is pretended. Sampling changes apply to the next
request; engine changes go through ``Engine.reconfigure`` on a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from rich.text import Text
from textual.command import DiscoveryHit, Hit, Hits, Provider

from picochat.config import QuantConfig, SamplingParams, SchedulerConfig, SpecConfig
from picochat.errors import ConfigError
from picochat.tui.screens.value_dialog import ValueDialog

if TYPE_CHECKING:
    from picochat.tui.screens.chat import ChatScreen


@dataclass(frozen=True)
class PaletteCommand:
    name: str
    help: str
    run: Callable[[], Any]
    disabled_reason: str | None = None


@dataclass(frozen=True)
class SamplingField:
    field: str
    label: str
    parse: Callable[[str], Any]
    hint: str


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "off", "random") else int(text)


SAMPLING_FIELDS = (
    SamplingField("temperature", "temperature", float, "0 = greedy; typical 0.2 … 1.2"),
    SamplingField("top_p", "top-p", float, "nucleus probability mass in (0, 1]; 1 = off"),
    SamplingField("top_k", "top-k", int, "keep the k most likely tokens; -1 = off"),
    SamplingField("min_p", "min-p", float, "drop tokens below min-p × p(best); 0 = off"),
    SamplingField("repetition_penalty", "repetition penalty", float, "> 1 discourages repeats; 1 = off"),
    SamplingField("presence_penalty", "presence penalty", float, "-2 … 2; 0 = off"),
    SamplingField("frequency_penalty", "frequency penalty", float, "-2 … 2; 0 = off"),
    SamplingField("seed", "seed", _optional_int, "an integer for reproducible sampling; empty = random"),
    SamplingField("max_tokens", "max tokens", int, "longest reply in tokens"),
)


def _when_given(action: Callable[[Any], Any]) -> Callable[[Any], None]:
    """A dialog callback that runs ``action(value)`` unless the dialog was cancelled (None)."""
    def callback(value: Any) -> None:
        if value is not None:
            action(value)
    return callback


def _number(parse: Callable[[str], Any], label: str) -> Callable[[str], Any]:
    def parse_value(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            raise ConfigError(f"{label}: {text!r} is not a valid number") from None
    return parse_value


def sampling_commands(screen: "ChatScreen") -> list[PaletteCommand]:
    def edit(spec: SamplingField) -> None:
        parse = _number(spec.parse, spec.label)
        current = getattr(screen.sampling, spec.field)
        dialog = ValueDialog(f"sampling: {spec.label}", "" if current is None else str(current),
                             lambda text: screen.sampling.replace(**{spec.field: parse(text)}), spec.hint)

        screen.app.push_screen(dialog, _when_given(lambda value: setattr(screen, "sampling", value)))

    commands = [PaletteCommand(f"sampling: {spec.label}…", f"now {getattr(screen.sampling, spec.field)}",
                               partial(edit, spec)) for spec in SAMPLING_FIELDS]
    commands.append(PaletteCommand("sampling: reset to defaults", SamplingParams().summary(),
                                   lambda: setattr(screen, "sampling", SamplingParams())))
    return commands


def engine_commands(screen: "ChatScreen") -> list[PaletteCommand]:
    """quant:, batch:, spec:, attention:, model: — each disabled where the engine says so."""
    info = screen.engine.info
    commands: list[PaletteCommand] = []

    def add(area: str, name: str, help: str, run: Callable[[], Any], key: str | None = None) -> None:
        """``key`` names a single setting the engine may disable ("spec:draft"); else the area."""
        reason = info.unsupported.get(key or area) or info.unsupported.get(area)
        commands.append(PaletteCommand(f"{area}: {name}", help, run, reason))

    for mode in ("none", "int8", "int4"):
        add("quant", mode, "current" if info.quant == mode else "re-quantize the weights",
            partial(screen.reconfigure, f"quant {mode}", quant=QuantConfig(mode=mode)))

    current = {"max_num_seqs": info.max_num_seqs, "max_num_batched_tokens": info.max_num_batched_tokens}
    for field, label in (("max_num_seqs", "max sequences"), ("max_num_batched_tokens", "max batched tokens")):
        def edit(field: str = field, label: str = label) -> None:
            parse = _number(int, label)

            def validate(text: str) -> int:  # the same checks the engine applies
                value = parse(text)
                SchedulerConfig(**{**current, field: value}).validate()
                return value

            dialog = ValueDialog(f"batch: {label}", str(current[field]), validate)
            screen.app.push_screen(dialog, _when_given(
                lambda value: screen.reconfigure(f"batch {label} {value}", **{field: value})))
        add("batch", f"{label}…", f"now {current[field]}", edit)

    add("spec", "off", "no speculative decoding", partial(screen.reconfigure, "spec off", spec=SpecConfig()))
    add("spec", "n-gram (prompt lookup)", "propose tokens by matching the prompt",
        partial(screen.reconfigure, "spec n-gram", spec=SpecConfig(mode="ngram")))

    def draft() -> None:
        dialog = ValueDialog("spec: draft model (name or path)", "",
                             lambda text: SpecConfig(mode="draft", draft_model=text).validate())
        screen.app.push_screen(dialog, _when_given(lambda spec: screen.reconfigure("spec draft", spec=spec)))
    add("spec", "draft model…", "a small model proposes, the main model verifies", draft, key="spec:draft")

    def spec_k() -> None:
        mode = info.spec if info.spec != "off" else "ngram"
        parse = _number(int, "k")
        dialog = ValueDialog("spec: k, drafts per step", "4",
                             lambda text: SpecConfig(mode=mode, k=parse(text)).validate())
        screen.app.push_screen(dialog, _when_given(lambda spec: screen.reconfigure(f"spec {mode} k={spec.k}",
                                                                                   spec=spec)))
    add("spec", "k, drafts per step…", "1–16; applies to the next step", spec_k)
    add("spec", "highlight accepted drafts", "toggle (F4)", screen.action_toggle_drafts)

    for backend in ("auto", "triton", "sdpa", "reference"):
        add("attention", backend, "current" if info.attention == backend else "attention kernel backend",
            partial(screen.reconfigure, f"attention {backend}", attention=backend))

    def switch_model() -> None:
        def parse(text: str) -> str:
            if not text:
                raise ConfigError("model: give a model name or a path")
            return text
        dialog = ValueDialog("model: name or path", info.model, parse, "a model card name, a GGUF file or an HF dir")
        screen.app.push_screen(dialog, _when_given(lambda name: screen.reconfigure(f"model {name}", model=name)))
    add("model", "switch…", f"now {info.model}", switch_model)
    return commands


def session_commands(screen: "ChatScreen") -> list[PaletteCommand]:
    def load() -> None:
        def parse(text: str) -> int:
            n = _number(int, "requests")(text)
            if not 1 <= n <= 256:
                raise ConfigError(f"requests must be in 1..256, got {n}")
            return n
        dialog = ValueDialog("load: concurrent synthetic requests", "8", parse,
                             "watch them queue, batch and finish in the panels")
        screen.app.push_screen(dialog, _when_given(screen.fire_load))

    return [
        PaletteCommand("system prompt: edit…", "applies to the next request", screen.action_edit_system_prompt),
        PaletteCommand("export: transcript as Markdown", "into the data dir", partial(screen.export, "markdown")),
        PaletteCommand("export: transcript as JSON", "into the data dir", partial(screen.export, "json")),
        PaletteCommand("load: fire N concurrent requests…", "shows queueing and batching", load),
        PaletteCommand("chat: new", "Ctrl+N", screen.action_new_chat),
        PaletteCommand("chat: regenerate last reply", "Ctrl+R", screen.action_regenerate),
    ]


def theme_commands(app) -> list[PaletteCommand]:
    return [PaletteCommand(f"theme: {name}", "current" if app.theme == name else "saved in the user config",
                           partial(app.set_theme, name)) for name in app.console_themes]


class ConsoleCommands(Provider):
    """All palette commands of the console."""

    def _commands(self) -> list[PaletteCommand]:
        from picochat.tui.screens.chat import ChatScreen

        commands = theme_commands(self.app)
        if isinstance(self.screen, ChatScreen):
            commands = (sampling_commands(self.screen) + engine_commands(self.screen)
                        + session_commands(self.screen) + commands)
        return commands

    def _hit_parts(self, command: PaletteCommand) -> tuple[Text | str, Callable[[], Any], str]:
        if command.disabled_reason is None:
            return command.name, command.run, command.help
        reason = command.disabled_reason
        run = partial(self.app.notify, reason, title=f"{command.name}: unavailable", severity="warning")
        return Text(f"{command.name} (unavailable)", style="dim"), run, reason

    async def discover(self) -> Hits:
        for command in self._commands():
            display, run, help = self._hit_parts(command)
            yield DiscoveryHit(display, run, command.name, help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.name)
            if score > 0:
                display, run, help = self._hit_parts(command)
                if command.disabled_reason is None:
                    display = matcher.highlight(command.name)
                yield Hit(score, display, run, command.name, help)
