"""Runs a plan against the Ollama API: one model at a time per node, every step checked through `/api/ps`.

Per model, its steps run in order: evictions and the load on the target node (holding that node's slot),
then the removal of its CPU/partial copies elsewhere (each holding that node's slot) — only when its GPU
copy was verified. Different target nodes work in parallel. Before every step the node's `/api/ps` is read
again: a model already fully on GPU there means the work is done, a victim already gone needs no unload.

A load is verified by polling `/api/ps` until the copy shows `size_vram == size`. Once Ollama answered the
load its placement is final, so a copy that stays short of that for a settle period (4 polls, 1 s by default)
is a failure: it is unloaded again unless it is the only copy serving the model. A copy that a read after the
answer does not list is gone (Ollama unloaded it, e.g. to admit a busy client's request): the step fails at
once, the copy counts among the models Ollama evicted, and a model left with no copy is loaded again where
Ollama places it. A reload in place of a model's only copy first puts a copy on CPU on a node without a GPU.
A removal of a copy elsewhere runs only while the job's GPU copy is still listed fully on GPU (read again just
before), so the router never removes the last copy that serves a model. A `pin` asks Ollama again with the
options the copy was listed with and its configured keep_alive: no reload, only the keep_alive changes. Every
failure is recorded as an `Outcome`, never raised.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from gpurouter.cluster.config import model_key
from gpurouter.cluster.ollama import LoadedModel, OllamaClient, OllamaError
from gpurouter.cluster.state import ClusterState
from gpurouter.decide.placement import Plan, Step, is_busy
from gpurouter.sizing import eras
from gpurouter.sizing.hidden import inferred_hidden
from gpurouter.sizing.room import Room
from gpurouter.units import mb, size_text
from gpurouter.urls import redact

Event = Callable[[str, Step, str], None]  # (start|progress|done|failed, step, detail)
REUSED = 1.0  # seconds: a copy listed expiring this long after its unload was asked was used again since


@dataclass(frozen=True)
class Outcome:
    """What one step did. `skipped`: not attempted because an earlier step of its model failed;
    `verified`: after this step the model it serves was seen fully on GPU on the target."""

    step: Step
    ok: bool
    detail: str
    started: float
    duration: float
    skipped: bool = False
    verified: bool = False
    evicted: tuple[str, ...] = ()  # models Ollama unloaded on its own while this step loaded
    hidden: int = 0  # bytes inferred held outside Ollama: the room the load needed less what it got
    evidence: str | None = None  # the copy left loaded whose placement backs `hidden` (its change drops it)


@dataclass(frozen=True)
class Execution:
    """A plan and the outcome of each of its steps (none for a dry run)."""

    plan: Plan
    outcomes: tuple[Outcome, ...]
    dry_run: bool

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)


class _Failed(Exception):
    """A step failed; the message is its outcome's detail, `hidden` what the failure says is held elsewhere."""

    def __init__(self, message: str, hidden: int = 0, vanished: bool = False, evidence: str | None = None) -> None:
        super().__init__(message)
        self.hidden = hidden
        self.evidence = evidence
        self.vanished = vanished  # the step's own fresh copy disappeared: Ollama unloaded it


def execute(
    plan: Plan,
    state: ClusterState,
    clients: Mapping[str, OllamaClient],
    *,
    load_timeout: float,
    poll_interval: float = 0.25,
    dry_run: bool = False,
    on_event: Event | None = None,
    node_slots: Mapping[str, threading.Semaphore] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Execution:
    """Run `plan` (or, with `dry_run`, nothing) and return every step's outcome in plan order.

    `node_slots` (node → semaphore) lets callers share the one-model-at-a-time limit across executions;
    `wall` is the Unix clock that `expires_at` is compared with to tell busy models.
    """
    if dry_run or not plan.steps:
        return Execution(plan, (), dry_run)
    runner = _Runner(state, clients, load_timeout, poll_interval, on_event, node_slots, clock, wall, sleep)
    jobs: dict[str, list[int]] = {}
    for index, step in enumerate(plan.steps):
        jobs.setdefault(model_key(step.serves), []).append(index)
    by_node: dict[str, list[tuple[str, list[int]]]] = {}
    for model, indexes in jobs.items():
        steps = [plan.steps[i] for i in indexes]
        home = next((s.node for s in steps if s.action != "unload"), steps[0].node)
        by_node.setdefault(home, []).append((model, indexes))
    outcomes: dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=len(by_node), thread_name_prefix="execute") as pool:
        for node_jobs in by_node.values():
            pool.submit(runner.run_all, plan.steps, node_jobs, outcomes)
    return Execution(plan, tuple(outcomes[i] for i in range(len(plan.steps))), False)


class _Runner:
    """Runs jobs (one model's steps each); shared by the worker threads of one execution."""

    def __init__(
        self,
        state: ClusterState,
        clients: Mapping[str, OllamaClient],
        load_timeout: float,
        poll_interval: float,
        on_event: Event | None,
        node_slots: Mapping[str, threading.Semaphore] | None,
        clock: Callable[[], float],
        wall: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.state = state
        self.clients = clients
        self.load_timeout = load_timeout
        self.poll = poll_interval
        self.settle = 4 * poll_interval
        self.on_event = on_event
        self.shared = node_slots or {}
        self.slots: dict[str, threading.Semaphore] = {}
        self.backups: dict[str, set[str]] = {}  # model → nodes where `_backup` loaded a CPU copy
        self.lock = threading.Lock()
        self.clock, self.wall, self.sleep = clock, wall, sleep

    def _slot(self, node: str) -> threading.Semaphore:
        if node in self.shared:
            return self.shared[node]
        with self.lock:
            return self.slots.setdefault(node, threading.Semaphore(1))

    def _event(self, kind: str, step: Step, detail: str) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):  # a broken listener must not break the execution
                self.on_event(kind, step, detail)

    def run_all(self, steps: tuple[Step, ...], jobs: list[tuple[str, list[int]]], outcomes: dict[int, Outcome]) -> None:
        for model, indexes in jobs:
            try:
                self._job(model, steps, indexes, outcomes)
            except Exception as exc:  # never raised: whatever is left is recorded as failed
                for i in indexes:
                    if i not in outcomes:
                        outcomes[i] = self._record(steps[i], False, redact(f"internal error: {exc!r}"), self.clock())

    def _job(self, model: str, steps: tuple[Step, ...], indexes: list[int], outcomes: dict[int, Outcome]) -> None:
        """Evictions and the load on the target (holding its slot), then the removals once verified."""
        first = [i for i in indexes if steps[i].action != "unload"]
        later = [i for i in indexes if steps[i].action == "unload"]
        verified = not first and self.state.on_gpu(model)  # only removals: finishing a job already verified
        stop: str | None = None
        if first:
            with self._slot(steps[first[0]].node):
                for i in first:
                    step = steps[i]
                    if stop is not None:
                        outcomes[i] = self._skip(step, stop)
                    elif verified:
                        detail = f"not needed: {model} already fully on GPU on {step.node}"
                        outcomes[i] = self._record(step, True, detail, self.clock(), verified=True)
                    else:
                        outcomes[i] = self._run(step, model)
                        if not outcomes[i].ok:
                            stop = f"{step.action} of {step.model} on {step.node} failed"
                        verified = outcomes[i].verified
        home = next((steps[i].node for i in first if steps[i].action == "load"), None)
        for i in later:
            step = steps[i]
            if verified and not self._still_on_gpu(model, home):
                verified, stop = False, f"the GPU copy of {model} is gone again: every other copy is kept"
            if not verified:
                outcomes[i] = self._skip(step, stop or f"no verified GPU copy of {step.model}")
                continue
            with self._slot(step.node):
                outcomes[i] = self._run(step, model)

    def _still_on_gpu(self, model: str, home: str | None) -> bool:
        """Read again just before a removal: the model is listed fully on GPU on `home` (or, for a job of
        removals only, on a node of the state that answers)."""
        homes = [home] if home is not None else [n.name for n, m in self.state.placements(model) if m.fully_on_gpu]
        for node in homes:
            with contextlib.suppress(_Failed):
                copy = self._ps(node).get(model)
                if copy is not None and copy.fully_on_gpu:
                    return True
        return False

    def _skip(self, step: Step, why: str) -> Outcome:
        detail = f"skipped: {why}"
        self._event("failed", step, detail)
        return Outcome(step, False, detail, self.clock(), 0.0, skipped=True)

    def _record(
        self,
        step: Step,
        ok: bool,
        detail: str,
        started: float,
        verified: bool = False,
        evicted: tuple[str, ...] = (),
        hidden: int = 0,
        evidence: str | None = None,
    ) -> Outcome:
        if evicted:
            detail += f"; Ollama also unloaded {', '.join(evicted)} on its own"
        self._event("done" if ok else "failed", step, detail)
        duration = self.clock() - started
        return Outcome(step, ok, detail, started, duration, False, verified, evicted, hidden, evidence)

    def _run(self, step: Step, model: str) -> Outcome:
        """One step, after re-reading its node's /api/ps; a job model already fully on GPU there is done."""
        started = self.clock()
        self._event("start", step, _describe(step))
        actions = {"evict": self._evict, "release": self._evict, "load": self._load, "unload": self._unload}
        action = {**actions, "pin": self._pin}[step.action]
        loaded: dict[str, LoadedModel] = {}
        try:
            loaded = self._ps(step.node)
            copy = loaded.get(model)
            if step.action in ("evict", "load") and copy is not None and copy.fully_on_gpu:
                detail = f"not needed: {model} already fully on GPU on {step.node}"
                return self._record(step, True, detail, started, verified=True)
            detail = action(step, loaded)
        except _Failed as failed:
            gone = self._gone(step, loaded) + ((model_key(step.model),) if failed.vanished else ())
            return self._record(
                step, False, str(failed), started, evicted=gone, hidden=failed.hidden, evidence=failed.evidence
            )
        except OllamaError as exc:
            return self._record(step, False, str(exc), started, evicted=self._gone(step, loaded))
        loads = step.action == "load"
        gone = self._gone(step, loaded)
        hidden = self._refused_by_ollama(step, loaded) if gone else 0
        return self._record(step, True, detail, started, verified=loads, evicted=gone, hidden=hidden)

    def _gone(self, step: Step, before: Mapping[str, LoadedModel]) -> tuple[str, ...]:
        """Models listed before a load that Ollama unloaded on its own meanwhile (not the loaded model)."""
        if step.action != "load" or not before:
            return ()
        try:
            after = self._ps(step.node)
        except _Failed:
            return ()
        return tuple(sorted(set(before) - set(after) - {model_key(step.model)}))

    # ------------------------------------------------------------------------------------------ reads

    def _ps(self, node: str) -> dict[str, LoadedModel]:
        try:
            return {model_key(m.name): m for m in self.clients[node].ps()}
        except OllamaError as exc:
            raise _Failed(f"cannot read /api/ps of {node}: {exc}") from None

    def _wait_gone(self, node: str, model: str, was: LoadedModel, asked: float) -> bool:
        """Wait until the copy (`was`, as listed before) asked to unload at `asked` (Unix time) is gone: True;
        False when a request loaded or used it again meanwhile (listed with a new expiry, later than the unload
        left it): a client wants it, and waiting longer would only wait for the client."""
        deadline = self.clock() + self.load_timeout
        while (copy := self._ps(node).get(model_key(model))) is not None:
            expires = copy.expires_at
            if expires is not None and expires != was.expires_at and expires.timestamp() > asked + REUSED:
                return False
            if self.clock() >= deadline:
                raise _Failed(f"{model} still loaded on {node} after {self.load_timeout:g}s")
            self.sleep(self.poll)
        return True

    # ---------------------------------------------------------------------------------------- actions

    def _evict(self, step: Step, loaded: dict[str, LoadedModel]) -> str:
        copy = loaded.get(model_key(step.model))
        if copy is None:
            return "already gone"
        if is_busy(copy, self.wall()):
            raise _Failed(f"{step.model} on {step.node} is busy (requests in flight): not evicted")
        asked = self.wall()
        self.clients[step.node].unload(step.model, embedding=self.state.is_embedding(step.model))
        if not self._wait_gone(step.node, step.model, copy, asked):
            return f"asked {step.model} on {step.node} to unload; a client loaded it again at once"
        return f"unloaded {step.model} from {step.node} ({size_text(copy.size_vram)} of VRAM freed)"

    def _load(self, step: Step, loaded: dict[str, LoadedModel]) -> str:
        """Load and verify; a reload in place of the model's only copy first puts a copy on CPU on a node
        without a GPU that has it installed (where there is one), removed again once it is not the only copy:
        the reload stops the old runner, and the model must not be without a copy meanwhile."""
        copy = loaded.get(model_key(step.model))
        backup = self._backup(step) if copy is not None and step.num_gpu is not None else None
        try:
            detail = self._load_verified(step, loaded)
        except _Failed as failed:
            raise _Failed(
                str(failed) + self._drop_backup(step, backup), failed.hidden, failed.vanished, failed.evidence
            ) from None
        return detail + self._drop_backup(step, backup)

    def _backup(self, step: Step) -> str | None:
        """The node a CPU copy was loaded on so that the model keeps one while its only copy reloads; None
        when another node serves it already, or no node without a GPU has it installed."""
        key = model_key(step.model)
        if any(self._serves(name, key) for name in self.clients if name != step.node):
            return None
        spare = sorted(
            (n for n in self.state.nodes if n.up and not n.config.maintenance and n.name != step.node),
            key=lambda n: (len(n.loaded), n.name),
        )
        for node in spare:
            if node.capacity.source == "none" or node.vram_total == 0:
                if node.installed_model(key) is None:
                    continue
                self._event("progress", step, f"loading a copy on {node.name} first: the reload stops the only one")
                try:
                    self._request_load(replace(step, node=node.name), 0)
                except OllamaError:
                    continue
                if self._serves(node.name, key):
                    with self.lock:
                        self.backups.setdefault(key, set()).add(node.name)
                    return node.name
        return None

    def _drop_backup(self, step: Step, backup: str | None) -> str:
        """Remove the CPU copy `_backup` loaded, once the step's node lists the model again."""
        if backup is None:
            return ""
        key = model_key(step.model)
        if not self._serves(step.node, key):
            return f"; the copy on {backup} kept serving it"
        with contextlib.suppress(_Failed, OllamaError):
            copy = self._ps(backup).get(key)
            if copy is not None:
                asked = self.wall()
                self.clients[backup].unload(step.model, embedding=self.state.is_embedding(step.model))
                self._wait_gone(backup, step.model, copy, asked)
            return f"; a copy on {backup} served it meanwhile"
        return f"; the copy loaded on {backup} meanwhile is left there"

    def _load_verified(self, step: Step, loaded: dict[str, LoadedModel]) -> str:
        """Load and verify. A reload in place asks for every layer (`num_gpu`), and once more with one layer
        more when the copy stays partial: Ollama keeps a runner whose options match the request, so a copy an
        earlier forced load left partial only moves when the value differs. If the forced load fails (on
        llama-server: out of memory, after Ollama already stopped the old runner) the model is loaded again
        the way Ollama places it by itself, so it stays served."""
        key = model_key(step.model)
        copy = loaded.get(key)
        if copy is not None and step.num_gpu is None:
            raise _Failed(f"{step.model} is loaded on {step.node} {copy.gpu_ratio:.0%} on GPU; not reloaded")
        attempts = [None] if step.num_gpu is None else [step.num_gpu, step.num_gpu + 1]
        for attempt, num_gpu in enumerate(attempts, start=1):
            try:
                self._request_load(step, num_gpu)
            except OllamaError as exc:
                restored = self._restore(step) if num_gpu is not None else ""
                hidden = self._hidden(step, loaded, 0)
                detail = f"load failed: {exc}{restored or self._undo(step)}"
                raise _Failed(detail, hidden, evidence=self._left(step)) from None
            copy = self._verify(step)
            if copy is not None and copy.fully_on_gpu:
                return f"{step.model} now on GPU on {step.node} ({size_text(copy.size)}, 100% GPU)"
            if copy is None or attempt == len(attempts):
                break
            self._event("progress", step, f"still {copy.gpu_ratio:.0%} on GPU; asking again with num_gpu {num_gpu + 1}")
        if copy is None:
            why = f"{step.model} not listed on {step.node} after Ollama answered the load: gone{self._restore(step)}"
            raise _Failed(why, vanished=True, evidence=self._left(step))
        landed = f"landed {copy.gpu_ratio:.0%} on GPU ({mb(copy.size_vram)} of {size_text(copy.size)})"
        hidden = self._hidden(step, loaded, copy.size_vram)
        detail = landed + self._undo(step)
        raise _Failed(detail, hidden, evidence=self._left(step))

    def _left(self, step: Step) -> str | None:
        """The model when a copy of it is still listed on the step's node (after a load that came up short)."""
        with contextlib.suppress(_Failed):
            if model_key(step.model) in self._ps(step.node):
                return model_key(step.model)
        return None

    def _hidden(self, step: Step, before: Mapping[str, LoadedModel], landed: int) -> int:
        """What a load that came up short says is held outside Ollama (0 when the router never counted room
        for all of it): `inferred_hidden` over the node as the router saw it before the load."""
        node = self.state.node(step.node)
        room = Room.of(node) if node is not None else None
        if node is None or room is None or step.need is None:
            return 0
        others = sum(m.size_vram for key, m in before.items() if key != model_key(step.model))
        return inferred_hidden(room.era, step.need, landed, room.total - others - node.hidden)

    def _refused_by_ollama(self, step: Step, before: Mapping[str, LoadedModel]) -> int:
        """What an eviction Ollama made on its own says is held outside Ollama: on llama-server Ollama evicts
        when the prediction exceeds 80 % of the free memory, so where the router's own figures admitted the load,
        at least the difference between the free memory it counted and the least that admits it is hidden; in
        the classic era Ollama evicts when its estimate does not fit the free memory, so at least what the router
        counted free beyond the need is."""
        node = self.state.node(step.node)
        room = Room.of(node) if node is not None else None
        need = self.state.need(step.model, step.node)
        if node is None or room is None or need is None:
            return 0
        others = sum(m.size_vram for key, m in before.items() if key != model_key(step.model))
        free = room.total - others - node.hidden
        if need.era != eras.LLAMA_SERVER:
            return max(0, free - need.bytes + 1)
        if need.admission is None:
            return 0
        least = -(-need.admission.predicted(free) * 100 // 80)  # the smallest free memory Ollama admits it in
        return max(0, free - least + 1) if need.admission.admits(free) else 0

    def _request_load(self, step: Step, num_gpu: int | None) -> None:
        self.clients[step.node].load(
            step.model,
            num_ctx=step.num_ctx,
            keep_alive=step.keep_alive,
            num_gpu=num_gpu,
            embedding=self.state.is_embedding(step.model),
            timeout=self.load_timeout,
        )

    def _verify(self, step: Step) -> LoadedModel | None:
        """The copy once it is fully on GPU, or as it stood when the settle period ended; None as soon as a read
        does not list it: Ollama answered the load, so the copy is listed at once unless something (Ollama, for
        another request) unloaded it again."""
        self._event("progress", step, "loaded; verifying on /api/ps")
        key = model_key(step.model)
        settle_until = self.clock() + self.settle
        while True:
            copy = self._ps(step.node).get(key)
            if copy is None or copy.fully_on_gpu or self.clock() >= settle_until:
                return copy
            self.sleep(self.poll)

    def _restore(self, step: Step) -> str:
        """After a failed reload in place, or a fresh copy that vanished: when the model is now loaded nowhere,
        load it the way Ollama places it by itself (llama.cpp's fit, or the classic estimate), so it is served
        again — on CPU (`num_gpu: 0`) where other models are loaded, whom a load Ollama places could evict."""
        key = model_key(step.model)
        loaded = self._ps(step.node)
        if key in loaded:
            return "; the copy was kept"
        if self._served_elsewhere(step):
            return ""
        node = self.state.node(step.node)
        others = loaded or (node is not None and any(model_key(m.name) != key for m in node.loaded))
        try:
            self._request_load(step, 0 if others else None)
        except OllamaError as exc:
            return f"; could not load it again: {exc}"
        copy = self._ps(step.node).get(key)
        if copy is None:
            return "; loaded again, but not listed"
        return f"; loaded again {copy.gpu_ratio:.0%} on GPU so that it stays served"

    def _undo(self, step: Step) -> str:
        """Unload a copy that did not land on GPU, unless it is the only one serving the model."""
        key = model_key(step.model)
        copy = self._ps(step.node).get(key)
        if copy is None or copy.fully_on_gpu:
            return ""
        serving = self._served_elsewhere(step)
        if not serving:
            return "; kept: it is the only copy serving the model"
        asked = self.wall()
        self.clients[step.node].unload(step.model, embedding=self.state.is_embedding(step.model))
        if not self._wait_gone(step.node, step.model, copy, asked):
            return "; asked to unload it again, but a client uses it"
        return f"; unloaded again, still served on {', '.join(serving)}"

    def _served_elsewhere(self, step: Step) -> list[str]:
        """The other nodes that list the step's model now: where the state saw a copy, and a CPU copy loaded
        meanwhile so that it kept one (`_backup`)."""
        key = model_key(step.model)
        nodes = {n.name for n, _ in self.state.placements(key)} | self.backups.get(key, set())
        return sorted(n for n in nodes - {step.node} if n in self.clients and self._serves(n, key))

    def _serves(self, node: str, key: str) -> bool:
        try:
            return key in self._ps(node)
        except _Failed:
            return False

    def _unload(self, step: Step, loaded: dict[str, LoadedModel]) -> str:
        copy = loaded.get(model_key(step.model))
        if copy is None:
            return "already gone"
        if copy.fully_on_gpu:
            return f"kept: {step.model} is now fully on GPU on {step.node} too"
        asked = self.wall()
        self.clients[step.node].unload(step.model, embedding=self.state.is_embedding(step.model))
        if not self._wait_gone(step.node, step.model, copy, asked):
            return f"asked to remove the copy on {step.node}; a client loaded it again at once"
        return f"removed the {copy.gpu_ratio:.0%}-on-GPU copy from {step.node}"

    def _pin(self, step: Step, loaded: dict[str, LoadedModel]) -> str:
        """Ask for the copy again with the context it was listed with and the configured keep_alive (a request
        that leaves num_gpu unset matches any runner: Ollama keeps it and only resets its expiry)."""
        copy = loaded.get(model_key(step.model))
        if copy is None:
            raise _Failed(f"{step.model} is no longer loaded on {step.node}: nothing to pin")
        if is_busy(copy, self.wall()):
            return f"not now: {step.model} on {step.node} is busy (a later pass pins it)"
        self.clients[step.node].load(
            step.model,
            num_ctx=copy.context_length or step.num_ctx,
            keep_alive=step.keep_alive,
            embedding=self.state.is_embedding(step.model),
            timeout=self.load_timeout,
        )
        after = self._ps(step.node).get(model_key(step.model))
        if after is None or after.placement != copy.placement:
            raise _Failed(f"{step.model} on {step.node} was reloaded by the pin request")
        return f"pinned {step.model} on {step.node} (keep_alive {step.keep_alive}), copy kept as it was"


def _describe(step: Step) -> str:
    if step.action == "load":
        return f"Loading {step.model} on GPU at {step.node}..."
    if step.action == "pin":
        return f"Pinning {step.model} on {step.node} (keep_alive {step.keep_alive})..."
    if step.action == "evict":
        return f"Evicting {step.model} from {step.node} ({step.reason})..."
    if step.action == "release":
        return f"Releasing {step.model} from {step.node} ({step.reason})..."
    return f"Removing the CPU copy of {step.model} from {step.node}..."
