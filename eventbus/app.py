"""An app from the command line's targets: modules using @subscribe, or `module:attribute` naming routers or a bus."""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .bus import EventBus
from .errors import ConfigError
from .registry import Router, default_router
from .settings import Settings

_PACKAGE = Path(__file__).resolve().parent
#: The checkout's example app, relative to the directory a command runs in.
_EXAMPLE_APP = Path("handlers") / "demo.py"


def import_target(module: str) -> object:
    """Import a handler module, turning whatever goes wrong into one `ConfigError` line."""
    if module.endswith(".py") or "/" in module:
        dotted = module.removesuffix(".py").strip("./").replace("/", ".")
        raise ConfigError(f"{module!r} is a path: name the module instead, `{dotted}`")
    try:
        return importlib.import_module(module)
    except (ValueError, TypeError) as exc:
        # Bad @subscribe options (refused by registration, or by Python calling the decorator): our line says it all.
        if _raised_by_us(exc) or "subscribe()" in str(exc):
            hint = _subscribe_hint(str(exc)) if isinstance(exc, TypeError) else ""
            raise ConfigError(f"cannot load handlers from {module!r}: {exc}{hint}") from None
        raise _import_failed(module, exc) from None
    except Exception as exc:
        raise _import_failed(module, exc) from None


def _import_failed(module: str, exc: Exception) -> ConfigError:
    """The error for a module that failed to import, with the user's traceback unless the module is not there."""
    error = ConfigError(f"cannot import handler module {module!r}: {type(exc).__name__}: {exc}")
    if not (isinstance(exc, ModuleNotFoundError) and exc.name is not None and module.startswith(exc.name)):
        error.details = _user_traceback(exc)
    return error


def _raised_by_us(exc: BaseException) -> bool:
    """Whether the innermost frame of the traceback is in this package (registration refusing an option)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's module down, without the import machinery's frames or ours."""
    found = traceback.TracebackException.from_exception(exc)
    machinery = (str(Path(importlib.__file__).parent), "<frozen importlib", __file__)
    found.stack = traceback.StackSummary.from_list([f for f in found.stack if not f.filename.startswith(machinery)])
    return "".join(found.format())


def _subscribe_hint(error: str) -> str:
    """What to write instead, for the mistakes Python words for the decorator rather than for its user."""
    if "missing 1 required positional argument: 'group'" in error:
        return ' (@subscribe needs a topic and a group: write @subscribe("orders", "billing"))'
    return ""


def load(targets: Sequence[str], settings: Settings) -> EventBus:
    """The bus to run: the targets' routers (a plain module contributes the default registry), or their EventBus."""
    routers, bus = resolve(targets)
    return bus if bus is not None else EventBus(settings, routers=routers)


def resolve(targets: Sequence[str]) -> tuple[list[Router], EventBus | None]:
    """Import the targets: their routers, and the EventBus when a target names one (its routers are the app's)."""
    if not targets:
        example = "; in this checkout, the example app: `handlers handlers.demo`" if _EXAMPLE_APP.exists() else ""
        raise ConfigError(
            "name the app: `myapp.handlers` (a module using @subscribe) or `myapp:router` "
            f"(a Router, a list of routers, or an EventBus){example}"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` has it
    routers: list[Router] = []
    buses: list[EventBus] = []
    for target in targets:
        module_name, _, attribute = target.partition(":")
        module = import_target(module_name)
        if not attribute:
            if default_router not in routers:
                routers.append(default_router)
            continue
        try:
            value = getattr(module, attribute)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
        if isinstance(value, EventBus):
            buses.append(value)
        elif isinstance(value, Router):
            routers.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(r, Router) for r in value):
            routers.extend(value)
        else:
            raise ConfigError(
                f"{target} is a {type(value).__name__}: name a Router, a list of routers, or an EventBus"
            )
    if buses:
        if len(buses) > 1 or routers:
            raise ConfigError("an EventBus target runs alone: name one EventBus, or routers and modules")
        return buses[0].routers, buses[0]
    return routers, None
