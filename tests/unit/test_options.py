"""Every option is written once, in rayclip.options: the CLI's flags are generated from it and
the library's defaults are its defaults, so a default, a help text or a flag's meaning cannot drift."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import typing
from pathlib import Path

import pytest
import uvicorn

from rayclip import cli, export, model, options, pipeline, train
from rayclip.eval import recall
from rayclip.http import app, ray_serve
from rayclip.options import (
    DEFAULT_COLLAPSE,
    DemoOptions,
    EmbedOptions,
    EvalOptions,
    ExportOptions,
    IndexOptions,
    IngestOptions,
    ModelOptions,
    SearchOptions,
    ServeOptions,
    TrainOptions,
)
from rayclip.query import service as service_module
from rayclip.query.searcher import Searcher
from rayclip.stages import captions, embed, index, ingest

ALL = [ModelOptions, IngestOptions, EmbedOptions, IndexOptions, SearchOptions, ServeOptions, EvalOptions, DemoOptions]
ALL.append(TrainOptions)
ALL.append(ExportOptions)
# What each command offers: a whole class, or (class, the fields it takes from it).
OFFERS = {
    "ingest": [IngestOptions],
    "embed": [ModelOptions, EmbedOptions],
    "index": [IndexOptions],
    "search": [SearchOptions],
    "export": [ExportOptions, (SearchOptions, {"k", "where", "model_version", "precision"})],
    "eval": [ModelOptions, EvalOptions, (EmbedOptions, {"actors", "batch_size"}),
             (IngestOptions, {"url_col", "caption_col"})],
    "demo": [DemoOptions, (EmbedOptions, {"actors", "batch_size"}), (EvalOptions, {"recall_at"})],
    "train-reference": [TrainOptions],
    "serve": [ServeOptions],
    "status": [],
    "gc": [],
}  # fmt: skip
MINIMAL = {
    "ingest": ["--metadata", "m.parquet"],
    "eval": ["--metadata", "m.parquet"],
    "export": ["--to", "out"],
}  # the least each command needs
# Where each command's options go: every one of them must be a parameter of one of these.
CONSUMERS = {
    "ingest": [ingest.ingest_metadata],
    "embed": [model.resolve, embed.embed, pipeline.embed_silver],
    "index": [index.build],
    "export": [export.export],
    "search": [SearchOptions],  # the CLI builds the whole SearchOptions and hands it to query.service.search
    "eval": [model.resolve, pipeline.evaluate_metadata, pipeline.evaluate_benchmark],
    "demo": [pipeline.run_demo],
    "train-reference": [train.train_reference],
    "serve": [app.create_app, ray_serve.deploy],
}
# Options a command uses itself rather than hand to the library: where to listen and whether anonymous
# is allowed (uvicorn, check_bind), the MiB and origins it converts to create_app's bytes and list.
USED_BY_THE_CLI = {
    "train-reference": {"out"},
    "serve": {"host", "port", "allow_anonymous", "max_upload_mb", "cors_origin", "ray"},
}
# The library's functions and the classes their defaults come from (the first class that has a field wins).
LIBRARY = {
    ingest.read_metadata: [IngestOptions],
    ingest.ingest_metadata: [IngestOptions],
    ingest.ingest_folder: [IngestOptions],
    ingest.ingest_webdataset: [IngestOptions],
    ingest.ingest_img2dataset_output: [IngestOptions],
    export.export: [ExportOptions, SearchOptions],
    embed.filed_as: [EmbedOptions],
    embed.embed: [EmbedOptions],
    captions.embed_captions: [EmbedOptions],
    pipeline.embed_silver: [EmbedOptions],
    index.build: [IndexOptions],
    model.resolve: [ModelOptions],
    pipeline.evaluate_metadata: [EvalOptions, EmbedOptions, IngestOptions, ModelOptions],
    pipeline.evaluate_benchmark: [EvalOptions, EmbedOptions, ModelOptions],
    pipeline.run_demo: [DemoOptions, EvalOptions, EmbedOptions],
    train.train_reference: [TrainOptions],
    Searcher.open: [SearchOptions],
    Searcher.search: [SearchOptions],
    Searcher.search_text: [SearchOptions],
    Searcher.search_image: [SearchOptions],
    Searcher.search_vectors: [SearchOptions],
    app.create_app: [ServeOptions],
    ray_serve.deploy: [ServeOptions],
    model.choose_precision: [ModelOptions],
    model.load_model: [ModelOptions],
}
# One meaning, each command's own default: the synthetic set's seed (training's, or one training never saw).
PER_COMMAND_DEFAULT = {"--seed"}


def parse(command: str, *args: str) -> argparse.Namespace:
    return cli.build_parser().parse_args([command, *MINIMAL.get(command, []), *args])


def offered(command: str) -> dict[str, object]:
    """The options a command must have, by name, with their dataclass defaults."""
    defaults: dict[str, object] = {}
    for entry in OFFERS[command]:
        cls, names = entry if isinstance(entry, tuple) else (entry, None)
        defaults |= {k: v for k, v in dataclasses.asdict(cls()).items() if names is None or k in names}
    return defaults


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", list(OFFERS))
def test_a_bare_command_line_parses_to_the_dataclass_defaults(command):
    assert set(OFFERS) == set(cli.COMMANDS)
    parsed = vars(parse(command))
    expected = offered(command)
    assert sorted(parsed["options"]) == sorted(expected)
    got = {name: tuple(parsed[name]) if isinstance(parsed[name], list) else parsed[name] for name in expected}
    assert got == expected


@pytest.mark.parametrize("function", list(LIBRARY), ids=lambda f: f.__qualname__)
def test_library_defaults_are_the_dataclass_defaults(function):
    defaults: dict[str, object] = {}
    for cls in reversed(LIBRARY[function]):
        defaults |= dataclasses.asdict(cls())
    parameters = inspect.signature(function).parameters
    checked = {name: p.default for name, p in parameters.items() if name in defaults and p.default is not p.empty}
    assert checked == {name: defaults[name] for name in checked}
    if function is app.create_app:  # the service takes bytes, the flag MiB
        assert parameters["max_upload_bytes"].default == ServeOptions().max_upload_bytes
    assert checked  # each takes at least one option


def test_the_scorers_cut_offs_are_the_eval_options():
    """eval's scorers call the cut-offs `ks` (recall_at is their metric function): checked by hand."""
    for scorer in (recall.evaluate, recall.score_benchmark):
        assert inspect.signature(scorer).parameters["ks"].default == EvalOptions.recall_at


@pytest.mark.parametrize("command", list(CONSUMERS))
def test_every_option_of_a_command_reaches_the_library(command):
    taken = {name for function in CONSUMERS[command] for name in inspect.signature(function).parameters}
    missing = set(offered(command)) - taken - USED_BY_THE_CLI.get(command, set())
    assert not missing, f"{command}: the CLI would drop {sorted(missing)}"


def test_a_field_name_means_one_thing_in_every_class():
    meanings: dict[str, set] = {}
    for cls in ALL:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = None if f.name in {flag[2:] for flag in PER_COMMAND_DEFAULT} else f.default
            meanings.setdefault(f.name, set()).add((str(hints[f.name]), default, tuple(sorted(f.metadata.items()))))
    assert {name: m for name, m in meanings.items() if len(m) > 1} == {}


def test_a_flag_means_one_thing_in_every_command():
    meanings: dict[str, dict[str, tuple]] = {}
    for command, sub in subparsers().items():
        for action in sub._actions:
            for flag in action.option_strings:
                if action.help == argparse.SUPPRESS:
                    continue
                shown = (action.help, action.default)
                if flag in PER_COMMAND_DEFAULT:  # the same words; the default each command's own
                    shown = (re.sub(r" \(default: [^)]*\)$", "", action.help),)
                meaning = (type(action), action.dest, action.type, action.choices, action.nargs, action.const, *shown)
                meanings.setdefault(flag, {})[command] = repr(meaning)  # lists (choices, defaults) are not hashable
    differing = {flag: by_command for flag, by_command in meanings.items() if len(set(by_command.values())) > 1}
    assert differing == {}
    assert {"--actors", "--batch-size", "--precision", "--model-version", "--dt", "--limit"} <= {
        flag for flag, by_command in meanings.items() if len(by_command) > 1
    }


def test_help_appends_the_default():
    helps = {command: sub.format_help() for command, sub in subparsers().items()}
    batch, cut_offs = EmbedOptions.batch_size, " ".join(map(str, EvalOptions.recall_at))
    assert f"images per batch (default: {batch})" in " ".join(helps["embed"].split())
    assert f"recall cut-offs (default: {cut_offs})" in " ".join(helps["eval"].split())


@pytest.mark.parametrize(
    "argv",
    [["embed", "--model-version", "mine"], ["eval", "--k", "1"], ["demo", "--k", "3"]],
)
def test_no_old_spellings_are_parsed(argv, capsys):
    """Nothing was released under other flag names: --save-as and --recall-at are the only ones (eval's
    --images still reaches --images-dir, as argparse takes any unambiguous prefix of a flag)."""
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # the seed's spellings
        (["embed", "--batch_size", "8"], {"batch_size": 8}),
        (["eval", "--batch_size", "8"], {"batch_size": 8}),
        (["search", "--q", "a", "--query", "b", "--k", "3"], {"q": ["a", "b"], "k": 3}),
        # the new ones
        (["embed", "--save-as", "mine", "--dt", "2026-01-02"], {"save_as": "mine", "dt": "2026-01-02"}),
        (["eval", "--recall-at", "2", "--images-dir", "pics"], {"recall_at": [2], "images_dir": "pics"}),
        (["search", "--collapse"], {"collapse": DEFAULT_COLLAPSE}),
        (["search", "--collapse", "0.9", "--where", "width > 1"], {"collapse": 0.9, "where": "width > 1"}),
        (["serve", "--cors-origin", "a", "--cors-origin", "*"], {"cors_origin": ["a", "*"]}),
        (["ingest", "--distributor", "ray", "--refetch"], {"distributor": "ray", "refetch": True}),
        (["embed", "--runtime", "openvino"], {"runtime": "openvino"}),
    ],
)
def test_spellings_parse_to_their_option(argv, expected):
    parsed = vars(parse(*argv))
    assert {name: parsed[name] for name in expected} == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "--actors", "0"],
        ["eval", "--recall-at", "0"],
        ["ingest", "--distributor", "spark"],
        ["embed", "--runtime", "onnx"],
    ],
)
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- every flag reaches the library call


class StopError(Exception):
    """Raised by a spied library call once it has recorded its arguments: no work is done."""


# What each command calls with its options: (module, name); the last one called stops the command.
CALLED = {
    "ingest": [(ingest, "ingest_metadata")],
    "embed": [(model, "named"), (pipeline.embedding, "embed_silver")],  # embed_silver checks the names when it has work
    "index": [(index, "build")],
    "export": [(export, "export")],
    "search": [(service_module, "search")],
    "eval": [(model, "resolve"), (pipeline, "evaluate_metadata")],
    "demo": [(pipeline, "run_demo")],
    "train-reference": [(train, "train_reference")],
    "serve": [(app, "create_app"), (uvicorn, "run")],
}
# Values that must have a form the CLI checks before the library call.
GIVEN = {"dt": "2026-01-02", "where": "width > 1", "model": "ViT-B-32", "pretrained": "openai", "host": "127.0.0.2"}


def a_value_unlike_the_default(action: argparse.Action) -> list[str]:
    """The flag with a value its default is not (valid for its type and choices)."""
    flag, default = action.option_strings[0], action.default
    if isinstance(action, argparse._StoreTrueAction):
        return [flag]
    if action.dest in GIVEN:
        return [flag, GIVEN[action.dest]]
    if action.choices:
        return [flag, str(next(c for c in action.choices if c != default and [c] != default))]
    if action.nargs in ("+", "*"):
        return [flag, "3", "7"] if action.type in (int, options._positive_int) else [flag, "x", "y"]
    if action.type in (int, options._positive_int):
        return [flag, str((default or 0) + 3)]
    if action.type is float:
        return [flag, str(default / 2 if default else 0.25)]
    return [flag, f"given-{action.dest}"]


def received_by(
    command: str, given: list[str], called: list[tuple], unset: frozenset = frozenset()
) -> tuple[dict, dict]:
    """(what the command line parsed to, what the spied library calls received, by parameter name)
    for `command` with `given` and every option but `unset` set unlike its default."""
    argv = [command, *given]
    for action in subparsers()[command]._actions:
        if action.dest in offered(command) and action.dest not in unset and action.help != argparse.SUPPRESS:
            argv += a_value_unlike_the_default(action)
    calls: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as patch:
        for i, (module, name) in enumerate(called):
            real = getattr(module, name)

            @functools.wraps(real)  # its signature: the CLI passes what the signature takes
            def spy(*args, _real=real, _name=name, _last=i == len(called) - 1, **kwargs):
                bound = inspect.signature(_real).bind_partial(*args, **kwargs).arguments
                extra = [p.name for p in inspect.signature(_real).parameters.values() if p.kind is p.VAR_KEYWORD]
                calls[_name] = bound | (bound.pop(extra[0], {}) if extra else {})
                if _last:
                    raise StopError
                return _real() if _name == "resolve" else _real(*args, **kwargs)  # a model this machine has

            patch.setattr(module, name, spy)
        with pytest.raises(StopError):
            cli.main(argv)
    return vars(cli.build_parser().parse_args(argv)), {k: v for call in calls.values() for k, v in call.items()}


# Each way a command runs, when it has several: what selects it, the calls it makes, the options
# that would select another way (left at their defaults).
MODES = {
    "search": [(["--q", "a red circle"], CALLED["search"], frozenset())],
    "eval": [
        (MINIMAL["eval"], CALLED["eval"], frozenset()),
        (["--dataset", "karpathy"], [(model, "resolve"), (pipeline, "evaluate_benchmark")], frozenset()),
    ],
    "serve": [
        ([], CALLED["serve"], frozenset({"ray", "replicas"})),
        ([], [(ray_serve, "deploy")], frozenset()),
    ],
}


@pytest.mark.parametrize("command", list(CALLED))
def test_every_flag_a_command_generates_reaches_its_library_call(command, monkeypatch, tmp_path):
    """Each option of the command, set to a value unlike its default, arrives at the library function
    (bound to its parameter name, positional or keyword) with the value parsed: a cmd_* that drops a
    flag or passes a constant for it fails here. A command with several modes (eval's --metadata and
    --dataset) passes each option in one of them."""
    monkeypatch.chdir(tmp_path)
    received: dict = {}
    for given, called, unset in MODES.get(command, [(MINIMAL.get(command, []), CALLED[command], frozenset())]):
        parsed, got = received_by(command, given, called, unset)
        received |= got
    if command == "search":
        received |= dataclasses.asdict(received.pop("options"))
    if command == "serve":
        received |= {"max_upload_mb": received["max_upload_bytes"] >> 20, "cors_origin": received["cors_origins"]}
    for name, default in offered(command).items():
        if name == "allow_anonymous":
            continue  # check_bind's: test_serving_claims
        if name == "ray":
            continue  # it chooses the call: with --ray only ray_serve.deploy stops the command
        want = parsed[name]
        assert want != (list(default) if isinstance(default, tuple) else default), f"{command} --{name}: a default"
        got = received.get(name, "(not passed)")
        got = list(got) if isinstance(got, tuple) else str(got) if isinstance(got, Path) else got
        assert got == want, f"{command} --{name}"
