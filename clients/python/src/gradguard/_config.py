"""What configures a guard besides its arguments: the mode and the job name
from the environment, and the check that names a mistyped option.

No torch here: `gradguard.watch` checks its options before importing it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, ParamSpec, TypeVar

Mode = Literal["enforce", "observe", "off"]
MODES: tuple[Mode, ...] = ("enforce", "observe", "off")

ENV_MODE = "GRADGUARD_MODE"
ENV_JOB = "GRADGUARD_JOB"
# Where a launcher names the run, in the order they are tried after $GRADGUARD_JOB:
# torchrun's rendezvous id ("none" when neither --rdzv-id nor a single-node
# run gave one), then the Slurm job.
LAUNCHER_JOB = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")

P = ParamSpec("P")
R = TypeVar("R")


def _did_you_mean(value: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_mode(mode: object, env: Mapping[str, str] | None = None) -> Mode:
    """The mode given, else `$GRADGUARD_MODE`, else "enforce"."""
    valid = ", ".join(MODES)
    if mode is None:
        env = os.environ if env is None else env
        raw = env.get(ENV_MODE, "")
        if not raw.strip():
            return "enforce"
        value = raw.strip().lower()
        for m in MODES:
            if value == m:
                return m
        raise ValueError(f"${ENV_MODE}={raw!r} is not a mode{_did_you_mean(value, MODES)}; valid modes: {valid}")
    for m in MODES:
        if mode == m:
            return m
    hint = _did_you_mean(mode, MODES) if isinstance(mode, str) else ""
    raise ValueError(f"mode must be one of {valid}; got {mode!r}{hint}")


def resolve_job(job: object, env: Mapping[str, str] | None = None, *, required: bool = True) -> str:
    """The job given, else `$GRADGUARD_JOB`, else the launcher's run id
    (`$TORCHELASTIC_RUN_ID`, `$SLURM_JOB_ID`): the same on every rank.
    Without any, a ValueError saying how to name it (or "" when not
    `required`)."""
    if job is not None:
        if not isinstance(job, str) or not job.strip():
            raise ValueError(f"job must be a non-empty string, got {job!r}")
        return job
    env = os.environ if env is None else env
    for name in (ENV_JOB, *LAUNCHER_JOB):
        value = env.get(name, "").strip()
        if value and not (name == "TORCHELASTIC_RUN_ID" and value == "none"):
            return value
    if not required:
        return ""
    raise ValueError(
        f"no job name: pass job= (the same on every rank of the run) or set ${ENV_JOB}; "
        "under torchrun (with --rdzv-id, or on one node) or Slurm the run's id "
        f"(${LAUNCHER_JOB[0]}, ${LAUNCHER_JOB[1]}) names it when neither is given"
    )


def options_of(fn: Callable[..., object]) -> tuple[str, ...]:
    """The keyword-only parameters of `fn`, sorted: its options."""
    params = inspect.signature(fn).parameters.values()
    return tuple(sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY))


def unknown_option(name: str, valid: Iterable[str], where: str) -> TypeError:
    """The error for option `name`, listing the `valid` ones and suggesting the closest."""
    valid = tuple(valid)
    return TypeError(f"{where}: unknown option {name!r}{_did_you_mean(name, valid)}; valid options: {', '.join(valid)}")


def check_options(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Raises `unknown_option` for the first name in `given` not in `valid`."""
    valid = tuple(valid)
    for name in given:
        if name not in valid:
            raise unknown_option(name, valid, where)


def named_options(fn: Callable[P, R]) -> Callable[P, R]:
    """Makes an unknown keyword argument to `fn` a TypeError that names it,
    lists `fn`'s options and suggests the closest, rather than Python's bare
    "unexpected keyword argument". The signature is unchanged, for
    `help()`, `inspect` and type checkers."""
    accepted = frozenset(inspect.signature(fn).parameters)
    valid = options_of(fn)
    where = fn.__qualname__.removesuffix(".__init__")
    if fn.__module__.startswith("gradguard"):
        where = f"gradguard.{where}"

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        for name in kwargs:
            if name not in accepted:
                raise unknown_option(name, valid, where)
        return fn(*args, **kwargs)

    return checked
