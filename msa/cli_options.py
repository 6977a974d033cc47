"""How the CLI turns stage configs into options, and options back into configs.

Every field of a stage's config dataclass is one option: its name (`text_model` ->
`--text-model`), its default, its type (a Literal's values are the choices `--help` lists
and shells complete; tuples are comma-separated), and as help the comment beside the
field in msa/core/config.py. So the defaults and the documentation live once, in
the config, and `--config FILE` can give any option by its field name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import typer

from msa.core import config as configs

# Keys a run's config.json holds beyond options: a --config FILE may carry them, unused.
RUN_RECORD_KEYS = {"kind", "feature_sets", "modalities_used", "base", "fusions", "seeds", "grid"}


CONFIG_CLASSES = (configs.ExtractConfig, configs.CaptionConfig, configs.TrainHeadConfig, configs.FinetuneConfig,
                  configs.PredictConfig, configs.EvaluateConfig, configs.ReportConfig)


# --help groups a command's options in these panels, in this order (what people look for first
# at the top); an option not named here is listed under "Other".
PANELS = {
    "Input and output": ("data", "cache", "out", "run", "features", "modalities", "split", "text", "image", "labels",
                         "ensemble", "probs", "text_run", "image_run", "limit", "shard"),
    "Model": ("fusion", "hidden", "dropout", "task", "sequence_encoder", "output_scaling", "text_model", "max_len",
              "pooling", "pool_layers", "image_model", "image_weights", "text_source", "captions", "text_normalise",
              "model", "backend", "prompt", "num_beams", "max_new_tokens", "lavis_python"),
    "Training": ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "seed", "grad_accum", "grad_clip",
                 "image_aug", "clean_text"),
    "Loss": ("loss", "class_weights", "label_smoothing", "focal_gamma", "rdrop_alpha", "modality_dropout",
             "aux_weight"),
    "Validation": ("select", "patience", "folds", "refit", "baseline", "val_ratio", "split_seed"),
    "Unfrozen encoder layers and adapters": ("unfreeze_text_layers", "unfreeze_image_stages", "text_split_layer",
                                             "image_split_stage", "lr_encoder", "lora_rank", "lora_targets",
                                             "layer_decay", "lr_fusion", "lr_head"),
    "Data problems": ("on_bad_image", "on_duplicate"),
    "Compute": ("device", "precision", "compile"),
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


class Settings:
    verbose = False  # known errors show their traceback too


@functools.cache
def field_help(config_class: type) -> dict[str, str]:
    """Each field's comment in the class source (`name: type = default  # help`)."""
    source = inspect.getsource(config_class)
    helps, name = {}, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and name is None:
            name = token.string  # the first name on a field's line
        elif token.type == tokenize.COMMENT and name is not None:
            helps[name] = token.string.lstrip("# ").strip()
        elif token.type == tokenize.NEWLINE:
            name = None
    return helps


def _optional_inner(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    return hint


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(_optional_inner(hint)) is tuple


def _is_layer_count(hint: Any) -> bool:
    """`LayerCount` (or `LayerCount | None`): typed at the command line as a number or `all`."""
    return set(typing.get_args(hint)) - {type(None)} == {int, Literal["all"]}


def parameters(config_class: type, skip: tuple[str, ...] = (), optional: tuple[str, ...] = (),
               choices: dict[str, tuple[str, ...]] | None = None) -> list[inspect.Parameter]:
    """One typer option per field of config_class (but `skip`); `optional`: fields without a
    default that a command can do without; `choices`: choices known only at run time."""
    hints, helps = typing.get_type_hints(config_class), field_help(config_class)
    params = []
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        hint, default = _optional_inner(hints[field.name]), field.default
        if _is_tuple(hint):
            hint, default = str, ",".join(map(str, default)) if default else None
        elif _is_layer_count(hint):
            hint, default = str, None if default is None else str(default)
        if field.name not in helps:
            raise TypeError(f"{config_class.__name__}.{field.name} has no comment to serve as its --help")
        help_text = helps[field.name] + "."
        named = (choices or {}).get(field.name) or (typing.get_args(hint) if typing.get_origin(hint) is Literal
                                                     else None)
        if named:  # checked by the config (one error path, with "did you mean"), listed in --help
            hint, help_text = str, f"{help_text} One of: {', '.join(map(str, named))}."
        if default is dataclasses.MISSING:
            default = None if field.name in optional else ...
        # A flag takes no value: no `<bool>` beside it.
        option = typer.Option(default, help=help_text, rich_help_panel=PANEL_OF.get(field.name, "Other"),
                              metavar="" if hint is bool else None)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hint))
    return params


def with_options(config_class: type, **kwargs):
    """Give a command (taking **options) the options of config_class, after its own parameters."""

    def add(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = [p for p in parameters(config_class, **kwargs) if p.name not in names]
        command.__signature__ = signature.replace(parameters=own + extra)
        return command

    return add


def from_options(config_class: type, options: dict, **overrides) -> Any:
    """The config from a command's options: comma-separated values become typed tuples."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name not in options:
            continue
        value = options[field.name]
        if _is_tuple(hints[field.name]) and isinstance(value, str | type(None)):
            kind = (typing.get_args(_optional_inner(hints[field.name])) or (str,))[0]
            parts = tuple(kind(v.strip()) for v in (value or "").split(",") if v.strip())
            optional = _optional_inner(hints[field.name]) is not hints[field.name]
            value = parts if parts or not optional else None  # an empty optional tuple means "not given"
        elif _is_layer_count(hints[field.name]):
            value = configs.layer_count(value)
        values[field.name] = value
    return config_class(**{**values, **overrides})


def load_config_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """--config FILE: its values become the options' defaults, so the command line overrides them."""
    if value is None:
        return value
    try:
        data = configs.read_config_file(value)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"{value}: {err}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values, got a "
                                 f"{type(data).__name__}")
    known = {p.name for p in ctx.command.params}
    fields = {f.name for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}
    defaults = {}
    hints = {name: hint for cls in CONFIG_CLASSES for name, hint in configs.declared_types(cls).items()}
    for key, item in data.items():
        key = key.replace("-", "_")
        if key not in known | fields | RUN_RECORD_KEYS:
            raise typer.BadParameter(f"{value}: unknown option {key!r}")
        if key in known and key in hints and item is not None:
            try:  # the file's values are typed already: `"epochs": true` is a mistake, not 1
                configs.check_value(key, hints[key], item)
            except configs.ConfigError as err:
                raise typer.BadParameter(f"{value}: {err}") from None
        if key in known and item is not None and not isinstance(item, dict):
            defaults[key] = ",".join(map(str, item)) if isinstance(item, list) else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option():
    return typer.Option(None, "--config", callback=load_config_file, is_eager=True, exists=True, dir_okay=False,
                        help="TOML, YAML or JSON file of options (keys as the options' names); options on the "
                             "command line override it. A run's config.json is one.")


def known_errors() -> tuple[type[Exception], ...]:
    from msa.core.errors import CacheError
    from msa.core.finite import NonFiniteError
    from msa.core.rundir import RunDirError
    from msa.data.mvsa import DataError
    from msa.models.text import EncoderLoadError

    return (DataError, EncoderLoadError, CacheError, RunDirError, configs.ConfigError, NonFiniteError,
            FileNotFoundError)


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def one_line_errors(command):
    """Our own errors (a problem the user can fix) and a full disk end in one line, `error: ...`,
    and exit code 2; anything else is a bug and keeps its traceback. --verbose: tracebacks always."""
    from msa.core.progress import errors

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from msa.core.errors import NO_ROOM, write_error

        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if Settings.verbose:
                raise
            errors.print("interrupted: rerun the same command to resume (finished work is kept)")
            raise typer.Exit(code=INTERRUPTED) from None
        except known_errors() + (OSError,) as err:
            if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno not in NO_ROOM:
                raise
            if Settings.verbose:
                raise
            if isinstance(err, OSError) and err.errno in NO_ROOM:
                err = write_error(Path(err.filename or "."), err)
            errors.print(f"[red]error:[/red] {err}", soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper
