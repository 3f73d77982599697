"""Gathering (`gather:` on a queue): hold the queue's items until a group of them is whole, then run the
queue's chain once, on one new item that holds them all.

Design note
-----------
Words: a *member* is an item of a gathering queue; its *group* is named by the member's rendered `by`
(its *key*); the member's *value* is its `expect` field (`CAM_L`). The *group item* is the item made when
the group is whole: named after the key (`GAME_1`, or `GAME_1.1` when an earlier group took the name), its
payload `<item>/<value>/...` holds each member's files (a bundle's contents, or a file and its extras),
hard-linked, and its fields are the fields every member has with the same value.

The sidecars are the only record. A member's sidecar says `waiting` at step `gather` with
`"gather": {"group", "member", "have", "missing", "deadline", "item"}` (`item`: the group item's name,
null until the group is whole). A group item's sidecar says where it came from, `"forwarded_from":
"gather:<key>"`, and `"gathered": {"group", "members": {value: member item}}`. `Gathering` keeps only an
index of these, rebuilt from them at every start, so a `kill -9` cannot leave two truths.

Making the group item is one idempotent sequence, run on the loop's thread:
 1. choose the name and record it in every member (`gather.item`);
 2. link the members' files into a hidden staging folder with a hand-over record (`layout.HANDOFF_FILE`);
 3. rename it into work/ under that exact name (if the name was taken meanwhile, choose again);
 4. write its sidecar from the record (`claiming.adopt_orphan`), then `gathered`;
 5. remove the members' own copies of their data: their folders keep nothing but the sidecar's pointer.
After a crash, recovery removes a staging folder (2) and adopts a renamed one (3, 4); members that name an
item which does not exist (1, 2) form it again under that name; members that name an existing one follow it.
The member data is removed only after the group item holds it (5), so re-forming always finds it.

A member follows its group item: when the item ends `done` (or `failed` for good) so does every member,
and its folder moves to done/ (failed/). A group still missing members at its deadline (the first member's
arrival plus `timeout`, kept in the sidecars) fails each member naming who is missing; `spoold retry` on
such a member makes it wait again with a fresh deadline. `spoold retry` on a member of a failed group
retries the group item. A member whose value is missing or not expected, or whose value the group already
has (waiting, or in a group item not finished), is rejected with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from spoold.daemon.claiming import reject
from spoold.daemon.config import Config, Queue
from spoold.daemon.gatherspec import GatherSpec
from spoold.daemon.groupfiles import (
    drop_member_data,
    duration_text,
    gathered_members,
    group_item_of,
    group_key,
    is_group_item,
    make_group_item,
    member_contents,
    member_info,
    move_finished,
    template_values,
)
from spoold.daemon.layout import QueueFolders
from spoold.daemon.retries import requeue_failed
from spoold.daemon.sidecar import ACTIVE_STATES, GATHER_STEP, Sidecar, error_record
from spoold.errors import TemplateError
from spoold.fsio import now_iso, parse_iso
from spoold.templates import render_path

log = logging.getLogger("spoold.gather")

# After the environment refused to make a group item (a full disk), so the loop does not spin on it.
RETRY_FORMING_SECONDS = 10.0


@dataclasses.dataclass
class Forming:
    """A group still waiting for members; `item` is set once its name is recorded in the members."""

    key: str
    deadline: float
    members: dict[str, Sidecar] = dataclasses.field(default_factory=dict)  # by value
    item: str | None = None
    retry_at: float = 0.0


@dataclasses.dataclass
class Formed:
    """A group item not finished yet: its values (for duplicates) and the members following it."""

    key: str
    values: set[str]
    members: dict[str, Sidecar] = dataclasses.field(default_factory=dict)  # by member item name
    sidecar: Sidecar | None = None


class Gathering:
    """One queue's groups. Owned by its `QueueBook`, called from the loop's thread; returns changed sidecars."""

    def __init__(self, config: Config, queue: Queue, folders: QueueFolders) -> None:
        self.config = config
        self.queue = queue
        self.folders = folders
        self._held: dict[str, Sidecar] = {}
        self._incoming: list[Sidecar] = []  # new or retried members, placed at the next step
        self._pointing: list[Sidecar] = []  # found naming a group item, checked against it at the next step
        self._forming: dict[str, Forming] = {}
        self._formed: dict[str, Formed] = {}

    @property
    def spec(self) -> GatherSpec | None:
        return self.queue.spec.gather

    # ---- taking items --------------------------------------------------------------------------------------

    def take(self, sidecar: Sidecar) -> bool:
        """An active item the queue tracks: True when it is a member, held here instead of running the chain."""
        if is_group_item(sidecar):
            formed = self._formed.setdefault(sidecar.name, Formed(group_key(sidecar), set()))
            formed.values |= set(gathered_members(sidecar))
            formed.sidecar = sidecar
            return False
        if sidecar.name in self._held:
            return True
        info = member_info(sidecar)
        # A member already gathered follows its group item, even when the queue no longer gathers.
        is_follower = info is not None and bool(info["item"])
        is_new = all(s.get("state") == "pending" for s in sidecar.doc["steps"])
        if not is_follower and (self.spec is None or not (is_new or (sidecar.state == "waiting" and info))):
            return False  # no gathering here, or it began its chain before the queue gathered
        self._held[sidecar.name] = sidecar
        if sidecar.state != "waiting" or info is None:
            self._incoming.append(sidecar)
        elif is_follower:
            self._pointing.append(sidecar)
        else:
            self._restore(sidecar, info)
        return True

    def _restore(self, member: Sidecar, info: dict[str, Any]) -> None:
        """A member that was waiting before a restart (or whose group item was never finished) waits again."""
        deadline = parse_iso(info.get("deadline")) or time.time() + self._timeout()
        group = self._forming.setdefault(info["group"], Forming(info["group"], deadline))
        group.deadline = min(group.deadline, deadline)
        if group.members.get(info["member"], member) is not member:
            self._incoming.append(member)  # two for one value: placing it again rejects the second
            return
        group.members[info["member"]] = member
        group.item = group.item or info["item"]

    # ---- the loop's tick -----------------------------------------------------------------------------------

    def step(self, now: float, busy: set[str]) -> list[Sidecar]:
        """Place new members, form whole groups, fail overdue ones; `now` is wall-clock time."""
        changed: list[Sidecar] = []
        pointing, self._pointing = self._pointing, []
        for member in pointing:
            changed += self._resolve(member)
        for name, formed in self._formed.items():
            # A crash between writing a group item's sidecar and its member list: write the list now.
            if formed.sidecar is not None and "gathered" not in formed.sidecar.doc and name not in busy:
                members = {str(m.doc["gather"]["member"]): n for n, m in formed.members.items()}
                formed.sidecar.mark_gathered({"group": formed.key, "members": dict(sorted(members.items()))})
        incoming, self._incoming = self._incoming, []
        for member in incoming:
            changed += self._place(member, now)
        for group in list(self._forming.values()):
            if self._is_whole(group):
                if now >= group.retry_at:
                    changed += self._form(group, now)
            elif now >= group.deadline:
                changed += self._expire(group)
        return changed

    def next_deadline(self) -> float | None:
        """When `step` has something to do (wall-clock time)."""
        if self._incoming or self._pointing:
            return time.time()
        times = [g.retry_at if self._is_whole(g) else g.deadline for g in self._forming.values()]
        return min(times, default=None)

    def group_ended(self, group: Sidecar) -> list[Sidecar]:
        """A group item finished (`done`, or `failed` for good): its members end the same way."""
        if not is_group_item(group):
            return []
        formed = self._formed.pop(group.name, None) or Formed(group_key(group), set())
        names = set(formed.members) | set(gathered_members(group).values())
        changed: list[Sidecar] = []
        for name in sorted(names):
            member = formed.members.get(name) or self._held.get(name) or Sidecar.load(self.folders.sidecar_path(name))
            info = member_info(member) if member is not None else None
            if member is not None and info is not None and info["item"] == group.name and member.state != group.state:
                changed += self._follow(member, group)
        return changed

    def reconfigure(self, config: Config, queue: Queue) -> list[str]:
        """A reload; when the queue no longer gathers, the members not yet gathered are returned to run alone."""
        self.config, self.queue = config, queue
        if self.spec is not None:
            return []
        released = [m for g in self._forming.values() for m in g.members.values()]
        released += [m for m in self._incoming if not (member_info(m) or {}).get("item")]
        self._forming.clear()
        self._incoming = [m for m in self._incoming if m not in released]
        for member in released:
            self._held.pop(member.name, None)
        return [m.name for m in released]

    # ---- members -------------------------------------------------------------------------------------------

    def _place(self, member: Sidecar, now: float) -> list[Sidecar]:
        """A new member (or one `spoold retry` sent back) joins its group, or is rejected with the reason."""
        info = member_info(member)
        if info is not None and info["item"]:
            return self._rejoin(member, info)
        identity = self._identify(member)
        if isinstance(identity, str):
            return self._reject(member, identity)
        key, value = identity
        problem = self._duplicate(key, value, member.name)
        if problem is not None:
            return self._reject(member, problem)
        group = self._forming.setdefault(key, Forming(key, now + self._timeout()))
        group.members[value] = member
        if self._is_whole(group):
            return []  # formed in this same step, which records everything at once
        for each_value, each in group.members.items():
            each.gather_waiting(self._info(group, each_value))
        missing = self._info(group, value)["missing"]
        log.info("%s/%s: waiting in group %s for %s", self.queue.name, member.name, key, ", ".join(missing))
        return list(group.members.values())

    def _identify(self, member: Sidecar) -> tuple[str, str] | str:
        """(group key, value) of a member, or why it cannot be one."""
        spec = self.spec
        assert spec is not None  # only called while the queue gathers
        raw = member.doc["fields"].get(spec.field)
        expected = ", ".join(spec.values)
        if raw is None:
            return f"field {spec.field!r} is missing; gather expects one of {expected}"
        value = str(raw) if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
        if value not in spec.values:
            return f"{spec.field} {raw!r} is not one of {expected} (gather.expect)"
        try:
            values = template_values(self.config, self.queue, member)
            key = str(render_path(spec.by, values, self.folders.work).relative_to(self.folders.work))
        except TemplateError as exc:
            return f"gather.by: {exc}"
        if "/" in key or key.startswith("."):
            return f"gather.by renders to {key!r}, which cannot name an item (one name, not starting with '.')"
        return key, value

    def _duplicate(self, key: str, value: str, name: str) -> str | None:
        field = self.spec.field if self.spec else "member"
        waiting = self._forming.get(key)
        other = waiting.members.get(value) if waiting else None
        if other is not None and other.name != name:
            return (f"duplicate member of group {key}: {field} {value} already arrived as {other.name}, "
                    "which waits for the rest of its group")  # fmt: skip
        for item, formed in self._formed.items():
            if formed.key == key and value in formed.values:
                return f"duplicate member of group {key}: {field} {value} is in group item {item}, not finished yet"
        return None

    def _rejoin(self, member: Sidecar, info: dict[str, Any]) -> list[Sidecar]:
        """`spoold retry` on a member already gathered: it follows its group item again, retrying it if failed."""
        name = info["item"]
        group = group_item_of(self.folders, name, info["group"])
        if group is None:
            return self._reject(member, f"its data went into group item {name}, which no longer exists")
        changed: list[Sidecar] = []
        if group.state == "failed" and requeue_failed(self.folders, name):
            log.info("%s/%s: retrying group item %s with its member", self.queue.name, member.name, name)
            group = Sidecar.load(self.folders.sidecar_path(name)) or group
            changed.append(group)
        if group.state not in ACTIVE_STATES:
            return [*self._follow(member, group), *changed]
        member.gather_waiting(info)
        formed = self._formed.setdefault(name, Formed(info["group"], set()))
        formed.values.add(info["member"])
        formed.members[member.name] = member
        return [member, *changed]

    def _resolve(self, member: Sidecar) -> list[Sidecar]:
        """A member found naming a group item (after a restart): follow it, or form it if it was never made."""
        info = member_info(member)
        assert info is not None
        group = group_item_of(self.folders, info["item"], info["group"])
        if group is None:
            self._restore(member, info)  # step 1 or 2 of forming was interrupted: form it again
            return []
        if group.state not in ACTIVE_STATES:
            return self._follow(member, group)
        formed = self._formed.setdefault(group.name, Formed(info["group"], set()))
        formed.values.add(info["member"])
        formed.members[member.name] = member
        drop_member_data(self.folders, member)  # a crash before step 5 left the member's copy
        return []

    def _follow(self, member: Sidecar, group: Sidecar) -> list[Sidecar]:
        error = None
        if group.state == "failed":
            cause = group.error or {}
            error = error_record(GATHER_STEP, str(cause.get("type") or "failed"), f"group item {group.name} failed"
                                 f": {cause.get('message') or 'no reason given'}", retryable=False)  # fmt: skip
        drop_member_data(self.folders, member)
        # Moved before its sidecar says so, so readers find it there; after a crash between the two, recovery
        # leaves a member's folder where it is and this runs again.
        self._move_out(member, group.state)
        member.gather_ended(group.state, error)
        self._held.pop(member.name, None)
        log.info("%s/%s: %s with group item %s", self.queue.name, member.name, group.state, group.name)
        return [member]

    def _reject(self, member: Sidecar, reason: str) -> list[Sidecar]:
        self._held.pop(member.name, None)
        reject(self.folders, member, reason)
        return [member]

    # ---- groups --------------------------------------------------------------------------------------------

    def _is_whole(self, group: Forming) -> bool:
        return self.spec is not None and set(self.spec.values) <= set(group.members)

    def _form(self, group: Forming, now: float) -> list[Sidecar]:
        """Make the group item of a whole group (the sequence in the module's note)."""
        empty = [v for v, m in group.members.items() if not member_contents(self.folders.work / m.name, None)]
        if empty:
            # Its data is gone (its folder vanished): the group waits for that member again.
            changed = [s for v in empty for s in self._reject(group.members.pop(v), "its folder in work/ holds "
                                                              "nothing to gather")]  # fmt: skip
            for value, member in group.members.items():
                member.gather_waiting(self._info(group, value))
            return [*changed, *group.members.values()]
        name = group.item if group.item and not self.folders.is_name_taken(group.item) else None
        if name is None:
            with self.folders.lock:
                name = self.folders.free_name(group.key)
        group.item = name
        members = list(group.members.values())
        try:
            for value, member in group.members.items():
                member.gather_waiting(self._info(group, value))
            item = make_group_item(self.config, self.queue, self.folders, name, group.key, group.members)
        except OSError as exc:
            log.error("%s: cannot make group item %s: %s; trying again in %gs", self.queue.name, name, exc,
                      RETRY_FORMING_SECONDS)  # fmt: skip
            group.retry_at = now + RETRY_FORMING_SECONDS
            return members
        if item is None:
            group.item = None  # another item took the name meanwhile: the next step chooses another
            return members
        # From here on the item exists: nothing below may send the group back to forming a second one.
        del self._forming[group.key]
        self._formed[name] = Formed(group.key, set(group.members), {m.name: m for m in members}, item)
        log.info("%s/%s: group %s is whole; its item runs the chain", self.queue.name, name, group.key)
        try:
            item.mark_gathered({"group": group.key, "members": {v: m.name for v, m in sorted(group.members.items())}})
            for member in members:
                drop_member_data(self.folders, member)
        except OSError as exc:
            log.error("%s/%s: cannot finish recording its members: %s", self.queue.name, name, exc)
        return [*members, item]

    def _expire(self, group: Forming) -> list[Sidecar]:
        spec = self.spec
        assert spec is not None
        missing = ", ".join(v for v in spec.values if v not in group.members)
        message = f"group {group.key} incomplete after {duration_text(float(spec.timeout))}: missing {missing}"
        del self._forming[group.key]
        for member in group.members.values():
            self._held.pop(member.name, None)
            self._move_out(member, "failed")
            member.failed(0, error_record(GATHER_STEP, "incomplete", message, retryable=False))
        log.error("%s: %s", self.queue.name, message)
        return list(group.members.values())

    # ---- helpers -------------------------------------------------------------------------------------------

    def _info(self, group: Forming, value: str) -> dict[str, Any]:
        values = self.spec.values if self.spec else sorted(group.members)
        return {"group": group.key, "member": value, "have": [v for v in values if v in group.members],
                "missing": [v for v in values if v not in group.members], "deadline": now_iso(group.deadline),
                "item": group.item}  # fmt: skip

    def _move_out(self, member: Sidecar, state: str) -> None:
        try:
            move_finished(self.queue, self.folders, member, state)
        except OSError as exc:
            # Its sidecar says it finished: the periodic pick-up moves it out of work/ later.
            log.error("%s/%s: cannot move the item to %s/: %s", self.queue.name, member.name, state, exc)

    def _timeout(self) -> float:
        return float(self.spec.timeout) if self.spec else 0.0
