"""``odmr-bridge postfix setup|remove``: wire the bridge into an existing Postfix.

Everything goes through ``postconf`` and ``postmap`` against a config
directory (``-c``), so a throwaway instance works the same as /etc/postfix:

* master.cf: an lmtp clone named after ``postfix.transport`` (``odmr``);
* main.cf ``transport_maps`` and ``relay_domains``: the bridge's transport
  map (its keys are the ATRN domains, so one file drives both);
* main.cf ``smtpd_milters``: the admission milter, when a milter address is
  given; Postfix's default ``milter_default_action = tempfail`` is what keeps
  mail out while the milter is down, so an explicit other value is reported.

Each step is checked first, so running setup twice changes nothing the
second time; ``remove`` undoes exactly what setup added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from odmr_bridge.config import Settings
from odmr_bridge.transport_map import map_path, run

LIST_SEPARATOR = ", "


@dataclasses.dataclass(frozen=True)
class Step:
    description: str
    postconf: tuple[str, ...] = ()
    action: Callable[[], None] | None = None


def _explicit(config_dir: str, name: str) -> str | None:
    """The value main.cf sets for *name*, or None when it is left at the default."""
    out = run(["postconf", "-c", config_dir, "-n", name]).strip()
    return out.split("=", 1)[1].strip() if out else None


def _elements(value: str) -> list[str]:
    return [e for e in value.replace(",", " ").split() if e]


def _list_entries(settings: Settings, milter: str | None) -> list[tuple[str, str]]:
    """The main.cf list parameters setup adds one element to, with that element."""
    table = f"hash:{map_path(settings)}"
    wanted = [("transport_maps", table), ("relay_domains", table)]
    if milter:
        wanted.append(("smtpd_milters", milter))
    return wanted


def _master_line(settings: Settings) -> str:
    return f"{settings.postfix.transport} unix - - n - - lmtp"


def plan_setup(settings: Settings, milter: str | None) -> list[Step]:
    d = settings.postfix.config_dir
    steps: list[Step] = []
    service = f"{settings.postfix.transport}/unix"
    if not run(["postconf", "-c", d, "-M", service]).strip():
        steps.append(Step(f"master.cf: add '{_master_line(settings)}'",
                          ("-Me", f"{service}={_master_line(settings)}")))
    path = map_path(settings)
    if not path.exists():
        def create() -> None:
            path.write_text("# ATRN domains: `odmr-bridge domain add` keeps this in step.\n")
            run(["postmap", "-c", d, f"hash:{path}"])
        steps.append(Step(f"create {path} and postmap it", action=create))
    for name, element in _list_entries(settings, milter):
        value = _explicit(d, name)
        if value is not None and element in _elements(value):
            continue
        new = f"{value}{LIST_SEPARATOR}{element}" if value else element
        steps.append(Step(f"main.cf: {name} = {new}", ("-e", f"{name} = {new}")))
    if milter:
        action = _explicit(d, "milter_default_action")
        if action not in (None, "tempfail"):
            steps.append(Step(f"warning: milter_default_action = {action}: with the milter "
                              "down Postfix would not tempfail; consider 'tempfail'"))
    return steps


def plan_remove(settings: Settings, milter: str | None) -> list[Step]:
    d = settings.postfix.config_dir
    steps: list[Step] = []
    service = f"{settings.postfix.transport}/unix"
    if run(["postconf", "-c", d, "-M", service]).strip():
        steps.append(Step(f"master.cf: remove the {service} service", ("-MX", service)))
    for name, element in _list_entries(settings, milter):
        value = _explicit(d, name)
        if value is None or element not in _elements(value):
            continue
        if value == element:
            steps.append(Step(f"main.cf: remove {name} (back to its default)", ("-X", name)))
            continue
        if value.endswith(LIST_SEPARATOR + element):
            new = value[: -len(LIST_SEPARATOR + element)]
        else:
            new = LIST_SEPARATOR.join(e for e in _elements(value) if e != element)
        steps.append(Step(f"main.cf: {name} = {new}", ("-e", f"{name} = {new}")))
    return steps


def apply(settings: Settings, steps: list[Step], dry_run: bool,
          say: Callable[[str], None]) -> None:
    for step in steps:
        say(("would " if dry_run else "") + step.description)
        if dry_run:
            continue
        if step.postconf:
            run(["postconf", "-c", settings.postfix.config_dir, *step.postconf])
        if step.action is not None:
            step.action()
    if not steps:
        say("nothing to change")
