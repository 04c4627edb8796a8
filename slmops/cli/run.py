"""``slmops run``: one-shot answers or an interactive chat, in this process, streaming as Ollama's CLI does."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Iterator

import typer

from slmops.cli.common import PullBar, console, err_console, local_engine, store
from slmops.cli.models import parameter_lines
from slmops.modelfile import render
from slmops.types import options as opts
from slmops.types.errors import ModelNotFound, SlmopsError
from slmops.types.name import ModelName

if TYPE_CHECKING:
    from slmops.engine.client import EngineClient
    from slmops.engine.outputs import Output, Stats

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (e.g. /set parameter temperature 0.2)
  /set system TEXT            Set the system message
  /show [info|parameters|template|system|modelfile|license]
  /clear                      Clear the conversation
  /bye                        Exit
  /?, /help                   This help

Use \"\"\" to begin and end a multi-line message."""


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}ms" if ns < 1e9 else f"{ns / 1e9:.3f}s"


def print_stats(s: Stats) -> None:
    lines = [
        ("total duration", _ms(s.total_duration)),
        ("load duration", _ms(s.load_duration)),
        ("prompt eval count", f"{s.prompt_eval_count} token(s)"),
        ("prompt eval duration", _ms(s.prompt_eval_duration)),
        ("prompt eval rate", f"{s.prompt_tokens_per_s:.2f} tokens/s"),
        ("eval count", f"{s.eval_count} token(s)"),
        ("eval duration", _ms(s.eval_duration)),
        ("eval rate", f"{s.eval_tokens_per_s:.2f} tokens/s"),
    ]
    for k, v in lines:
        err_console.print(f"{k + ':':<22}{v}", markup=False)


def _stream(it: Iterator[Output]) -> tuple[str, Stats | None]:
    """Print pieces as they come; Ctrl-C stops generation and keeps what was said."""
    parts: list[str] = []
    stats = None
    try:
        for out in it:
            if out.text:
                sys.stdout.write(out.text)
                sys.stdout.flush()
                parts.append(out.text)
            if out.done:
                stats = out.stats
    except KeyboardInterrupt:
        close = getattr(it, "close", None)
        if close:
            close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts), stats


def ensure_model(name: ModelName) -> None:
    s = store()
    if s.exists(name):
        return
    if s.catalog.lookup(name) is None:
        raise ModelNotFound(name.display)
    bar = PullBar()
    try:
        s.pull(name, bar)
    finally:
        bar.close()


def run(
    model: str = typer.Argument(..., help="Model name, e.g. smollm2:135m"),
    prompt: list[str] = typer.Argument(None, help="Prompt; without one, an interactive chat opens."),
    verbose: bool = typer.Option(False, "--verbose", help="Print timings after each response."),
) -> None:
    """Run a model: answer PROMPT, or chat interactively."""
    from slmops.engine.client import Request, spec_from_store

    name = ModelName.parse(model)
    ensure_model(name)
    engine = local_engine()  # llama.cpp loads only for commands that run a model
    spec = spec_from_store(store(), name)
    text = " ".join(prompt or [])
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        text = f"{text}\n{piped}".strip() if text else piped.strip()
    try:
        if text or not sys.stdin.isatty():
            _, stats = _stream(engine.run(spec, Request(messages=[{"role": "user", "content": text}])))
            if verbose and stats:
                print_stats(stats)
            return
        engine.load(spec)
        Chat(engine, spec, name, verbose).loop()
    finally:
        engine.close()


class Chat:
    def __init__(self, engine: EngineClient, spec, name: ModelName, verbose: bool):
        self.engine, self.spec, self.name, self.verbose = engine, spec, name, verbose
        self.history: list[dict[str, Any]] = []
        self.options: dict[str, Any] = {}
        self.system: str | None = None

    def read(self) -> str | None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        first = input(">>> ")
        if not first.lstrip().startswith('"""'):
            return first
        body = first.lstrip()[3:]
        lines = [body]
        while '"""' not in lines[-1]:
            lines.append(input("... "))
        joined = "\n".join(lines)
        return joined[: joined.index('"""')].strip("\n")

    def loop(self) -> None:
        console.print("Send a message (/? for help)", style="dim")
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                console.print("\nUse Ctrl + d or /bye to exit.")
                continue
            except EOFError:
                console.print()
                return
            if line is None or not line.strip():
                continue
            if line.startswith("/"):
                try:
                    if self.command(line.strip()):
                        return
                except SlmopsError as err:
                    err_console.print(f"Error: {err}", markup=False)
                continue
            self.ask(line)

    def ask(self, text: str) -> None:
        from slmops.engine.client import Request

        messages = list(self.history) + [{"role": "user", "content": text}]
        if self.system is not None:
            messages = [{"role": "system", "content": self.system}] + messages
        try:
            answer, stats = _stream(self.engine.run(self.spec, Request(messages=messages, options=self.options)))
        except SlmopsError as err:
            err_console.print(f"Error: {err}", markup=False)
            return
        console.print()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        if self.verbose and stats:
            print_stats(stats)

    def command(self, line: str) -> bool:
        words = line.split(None, 3)
        cmd = words[0].lower()
        if cmd in ("/bye", "/exit"):
            return True
        if cmd in ("/?", "/help"):
            console.print(HELP, markup=False)
        elif cmd == "/clear":
            self.history = []
            console.print("Cleared session context")
        elif cmd == "/set" and len(words) >= 2 and words[1] == "parameter":
            if len(words) < 4:
                raise SlmopsError("usage: /set parameter NAME VALUE")
            typed, _ = opts.validate({words[2]: words[3]})
            if words[2] == "stop":
                self.options.setdefault("stop", []).extend(typed["stop"])
            else:
                self.options.update(typed)
            console.print(f"Set parameter '{words[2]}' to '{words[3]}'", markup=False)
        elif cmd == "/set" and len(words) >= 2 and words[1] == "system":
            self.system = line.split(None, 2)[2] if len(line.split(None, 2)) > 2 else ""
            console.print("Set system message.")
        elif cmd == "/show":
            self.show(words[1] if len(words) > 1 else "info")
        else:
            console.print(f"Unknown command '{words[0]}'. Type /? for help", markup=False)
        return False

    def show(self, what: str) -> None:
        from slmops.modelfile import build

        mf = build.to_modelfile(store(), self.name)
        mf.parameters = {**mf.parameters, **self.options}
        if self.system is not None:
            mf.system = self.system
        text = {
            "modelfile": render(mf),
            "template": mf.template or "No template was specified for this model.",
            "system": mf.system or "No system message was specified for this model.",
            "license": "\n".join(mf.licenses) or "No license was specified for this model.",
            "parameters": "\n".join(parameter_lines(mf.parameters)) or "No parameters set.",
        }.get(what)
        if text is None:
            from slmops.cli.models import show as show_cmd
            show_cmd(self.name.display, False, False, False, False, False)
        else:
            console.print(text, markup=False, soft_wrap=True)
